"""The README's main command, ``novacron demo``: a live migration between two emulated hosts, there and
back, next to QEMU's own best migration over the same link (``docs/demo.md``).

Modules: ``settings`` (options, link parsing), ``run`` (the run itself), ``summary`` (the comparison
table). Nothing is imported here, so the CLI can read the settings without loading the agent, the API
and everything a run needs (about two seconds of every ``novacron`` command's start-up).
"""
