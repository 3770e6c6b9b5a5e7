"""The CIFAR-100 model zoo of the CRD/DKD benchmarks (RepDistiller, mdistiller), written here.

Every model's ``state_dict`` has the reference code's keys and shapes, so the published teacher
checkpoints load as they are; ``tests/reference/cifar_zoo.json`` holds the reference fingerprints.
Models return logits only: recipes tap stage outputs by module path (the zoo table in docs/guide/models.md).

Docs: docs/guide/models.md
"""
