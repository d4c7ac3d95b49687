"""``python -m ddlkit.worker``: the worker entry point (``ddlkit.rank.entry``)."""

from ddlkit.rank.entry import main

if __name__ == "__main__":
    main()
