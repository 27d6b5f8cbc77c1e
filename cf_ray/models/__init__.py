"""One registry for image and video backbones.

A backbone maps an input batch to a dict of pooled features per tap (``forward_features``) and
knows each tap's width (``feature_info``). Classification heads live outside the backbone, so a
saved state_dict is just the backbone with plain keys.
"""

from cf_ray.models import (
    resnet,  # noqa: F401,E402  (registers image backbones)
    video_resnet,  # noqa: F401,E402  (registers video backbones)
)
from cf_ray.models._registry import (
    Backbone,
    arch_defaults,
    backbone_modality,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = ["Backbone", "arch_defaults", "backbone_modality", "create_backbone", "list_backbones", "register_backbone"]
