"""The `adaptools` command line: `adaptools ...` or `python -m adaptools_cli ...` (`main.main`).

Start-up imports torch and every command, about a million objects and no cyclic garbage: the garbage collector's
passes over them would add a quarter of a second to every command, so it is off while they load.
"""
import gc

gc.disable()
try:
    from . import main  # noqa: F401
finally:
    gc.enable()
