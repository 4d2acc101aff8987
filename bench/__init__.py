"""keymux's benchmark: direct calls, a bare aiohttp pass-through and keymux, side by side.

Run it with `python -m bench` (see bench/README.md). Nothing here is imported by keymux.
"""
