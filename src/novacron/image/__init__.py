"""The test guest image: ``find_image(profile)`` for users of an image, ``build_image`` to make one."""

from novacron.image.builder import build_image, find_image, images_dir
from novacron.image.model import GuestImage, ImageError, ImageManifest, ImageSettingError
from novacron.image.profiles import PROFILES, Profile, WorkloadSettings, get_profile

__all__ = [
    "PROFILES",
    "GuestImage",
    "ImageError",
    "ImageManifest",
    "ImageSettingError",
    "Profile",
    "WorkloadSettings",
    "build_image",
    "find_image",
    "get_profile",
    "images_dir",
]
