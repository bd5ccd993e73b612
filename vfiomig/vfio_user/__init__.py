"""The vfio-user protocol subset vfiomig needs to migrate device state (spec v0.9.2)."""
