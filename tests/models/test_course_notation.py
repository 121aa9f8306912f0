"""The course's own layer notation builds the course's net, and says how it was read."""

import torch
import torch.nn as nn

from trainer.config import ModelConfig
from trainer.models import create_model


def linear_widths(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [linears[0].in_features, *(m.out_features for m in linears)]


def test_simplenet_in_the_courses_notation_is_the_courses_simplenet():
    course = create_model(ModelConfig(arch="simplenet", layers=[3072, 40, 10]), 10, 3, 32)
    ours = create_model(ModelConfig(arch="simplenet", layers=[40]), 10, 3, 32)
    assert linear_widths(course.model) == linear_widths(ours.model) == [3072, 40, 10]
    assert (
        course.notes
        == [
            "model.layers [3072, 40, 10] read as the course writes them (input width first, "
            "classes last): simplenet with layers [40]"
        ]
        and ours.notes == []
    )
    logistic = create_model(ModelConfig(arch="simplenet", layers=[3072, 10]), 10, 3, 32)
    assert linear_widths(logistic.model) == [3072, 10] and "no hidden layer" in logistic.notes[0]


def test_convnets_in_the_courses_notation_have_the_courses_convolutions():
    for arch in ("convnet", "convnet2"):
        course = create_model(ModelConfig(arch=arch, layers=[3, 20, 40, 80]), 10, 3, 32)
        ours = create_model(ModelConfig(arch=arch, layers=[20, 40, 80]), 10, 3, 32)
        convs = [[m.out_channels for m in b.model.modules() if isinstance(m, nn.Conv2d)] for b in (course, ours)]
        assert convs[0] == convs[1] == [20, 40, 80] and course.notes and not ours.notes
        x = torch.zeros(2, 3, 32, 32)
        assert course.model(x).shape == (2, 10)


def test_widths_that_are_not_the_courses_notation_are_left_alone():
    b = create_model(ModelConfig(arch="convnet", layers=[4, 20, 40]), 10, 3, 32)  # 4 is not the 3 input channels
    assert [m.out_channels for m in b.model.modules() if isinstance(m, nn.Conv2d)] == [4, 20, 40] and not b.notes
    b = create_model(ModelConfig(arch="simplenet", layers=[3072, 40]), 10, 3, 32)  # 40 is not the 10 classes
    assert linear_widths(b.model) == [3072, 3072, 40, 10] and not b.notes
