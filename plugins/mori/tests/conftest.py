"""Run the Mori tests against the in-repo mori.io stand-in, unless KVBRIDGE_MORI_REAL=1.

On an AMD host with amd-mori installed: ``KVBRIDGE_MORI_REAL=1 pytest plugins/mori/tests``.
Set before any test loads plugins; spawned test processes inherit it.
"""

import os

if os.environ.get("KVBRIDGE_MORI_REAL") != "1":
    os.environ["KVBRIDGE_MORI_IO_MODULE"] = "kvbridge_mori.standin"
    STANDIN = True
else:
    os.environ.pop("KVBRIDGE_MORI_IO_MODULE", None)
    STANDIN = False
