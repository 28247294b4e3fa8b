"""Bit-reproducible MKL results: imported first by every package of this project.

With more than one thread, MKL may pick a code path from the memory alignment of its inputs, so the
same seeded run could give slightly different floats depending on what the process allocated before
(measured: a REINFORCE policy on the SmolLM2 token cache came out different when another policy was
trained first in the same process, with 2 threads only). ``MKL_CBWR=AUTO,STRICT`` keeps the fastest
code path for the CPU but makes it independent of alignment. A value the user sets is kept. It must
be set before MKL's first call, so the packages import this module before anything touches torch.
"""
import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
