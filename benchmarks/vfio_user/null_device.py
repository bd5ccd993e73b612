"""vfiomig's own vfio-user server with `NullEmulator` (a device whose stream has no fixed
size: writes go to a 4 MiB ring, STOP_COPY returns READ_TOTAL bytes), the Python twin of
``vu_server.c``:

    python -m benchmarks.vfio_user.null_device SOCK READ_TOTAL [--store SIZE [--direct]] [--once]

``--store SIZE`` keeps the stream in one preallocated buffer of SIZE bytes (a device that
stores its state: copied there by ``write_data``, or with ``--direct`` received straight
into it through ``WriteBuffer``).
"""

from vfiomig.bench._vfio_user import main

if __name__ == "__main__":
    main()
