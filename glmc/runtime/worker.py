"""Entry point of a spawned worker process: `python -m glmc.runtime.worker RANK SPEC_JSON ADDRESS PORT`."""

import sys

from glmc.run_spec import RunSpec
from glmc.runtime.launch import Rendezvous, run_worker

if __name__ == "__main__":
    rank, spec, address, port = sys.argv[1:5]
    sys.exit(run_worker(int(rank), RunSpec.from_json(spec), Rendezvous(address, int(port))))
