"""Any torchvision classifier serves as teacher or student by ``model.arch``: the ones listed in the
README's "Bring your own teacher" are built here for 10 classes at 32 px and take one training step."""

import pytest
import torch

from distill_runner.errors import ConfigError
from distill_runner.models.factories import torchvision_model

# Small members of each family (the README lists them as tested); the larger ones of a family share its code.
TESTED = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5", "efficientnet_b0",
    "squeezenet1_1", "regnet_y_400mf", "regnet_x_400mf", "mnasnet0_5", "densenet121", "googlenet",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("arch", TESTED)
def test_torchvision_classifier_trains_and_predicts_at_32px(arch):
    torch.manual_seed(0)
    model = torchvision_model(arch, num_classes=10, image_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model.train()(images), target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(images[:1]).shape == (1, 10)


def test_an_arch_that_cannot_run_at_the_image_size_says_so_when_built():
    with pytest.raises(ConfigError, match=r"arch='maxvit_t': does not run on 32 px images \(RuntimeError: .*another"):
        torchvision_model("maxvit_t", num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match=r"arch='inception_v3': needs images of at least 75 px"):
        torchvision_model("inception_v3", num_classes=10, image_size=32)
