"""flexlb's Lua scripts (this folder ships as the package ``flexlb.lua``; see flexlb/state/scripts.py)."""
