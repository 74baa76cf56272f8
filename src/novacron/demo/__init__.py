"""The README's main command, ``novacron demo``: a live migration between two emulated hosts, there and
back, next to QEMU's own best migration over the same link (``docs/demo.md``)."""

from novacron.demo.run import DemoPrerequisiteError, check_prerequisites, run_demo
from novacron.demo.settings import DemoInputError, DemoLink, DemoSettings, parse_link
from novacron.demo.summary import DemoResult, print_summary, summary_table

__all__ = [
    "DemoInputError",
    "DemoLink",
    "DemoPrerequisiteError",
    "DemoResult",
    "DemoSettings",
    "check_prerequisites",
    "parse_link",
    "print_summary",
    "run_demo",
    "summary_table",
]
