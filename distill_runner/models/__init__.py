"""Models: factories (tiny CNN, torchvision, timm, the CIFAR-100 zoo), checkpoint loading, feature taps.

Docs: docs/guide/models.md
"""
