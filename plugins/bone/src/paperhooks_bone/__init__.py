"""paperhooks plugin ``bone``: Bone and BAT block adapters on frozen weights (Kang, arXiv 2409.15371)."""

from paperhooks_bone.functional import BoneBlock, bat_delta, bat_unmerge, bone_delta, bone_forward
from paperhooks_bone.plugin import Bone, BoneConfig

__all__ = [
    "Bone",
    "BoneBlock",
    "BoneConfig",
    "bat_delta",
    "bat_unmerge",
    "bone_delta",
    "bone_forward",
]
