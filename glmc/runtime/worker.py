"""Entry point of a worker process: `python -m glmc.runtime.worker RANK SPEC_JSON`."""

import sys

from glmc.runtime.launch import RankSpec, run_worker

if __name__ == "__main__":
    sys.exit(run_worker(int(sys.argv[1]), RankSpec.from_json(sys.argv[2])))
