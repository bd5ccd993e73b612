"""Tests against a real kernel VFIO driver (mtty) in a VM; collected last (tests/mtty_vm.py)."""
