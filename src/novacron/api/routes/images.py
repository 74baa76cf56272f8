"""Test guest images: which profiles exist and whether each is built (building stays a host command)."""

from __future__ import annotations

from fastapi import APIRouter

from novacron.api.deps import Viewer
from novacron.api.errors import ERROR_RESPONSES
from novacron.api.models import ImageOut, ProfileName
from novacron.errors import NotFoundError
from novacron.image import PROFILES, find_image, get_profile

router = APIRouter(prefix="/v1/images", tags=["images"], responses=ERROR_RESPONSES)


class ImageProfileNotFound(NotFoundError):
    """No image profile of that name."""


def _image(profile: str) -> ImageOut:
    if profile not in PROFILES:
        raise ImageProfileNotFound(f"no image profile {profile!r}", profile=profile,
                                   known=",".join(sorted(PROFILES)))  # fmt: skip
    prof = get_profile(profile)
    out = ImageOut(profile=profile, built=False, memory_mib=prof.memory_mib, vcpus=prof.vcpus)
    try:
        img = find_image(profile)
    except NotFoundError:
        return out
    m = img.manifest
    return out.model_copy(
        update={
            "built": True,
            "directory": str(img.directory),
            "content_hash": m.content_hash,
            "built_at": m.built_at,
            "kernel": f"{m.kernel_package} {m.kernel_version}",
            "initrd_bytes": m.initrd_bytes,
            "workload_defaults": dict(m.defaults),
        }
    )


@router.get("", name="image.list")
async def list_images(_: Viewer) -> list[ImageOut]:
    return [_image(p) for p in sorted(PROFILES)]


@router.get("/{profile}", name="image.show")
async def show_image(profile: ProfileName, _: Viewer) -> ImageOut:
    return _image(profile)
