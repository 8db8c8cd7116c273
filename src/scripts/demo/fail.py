# The talk's error example: rank 0 raises, the other ranks say hello. Run serially here, it prints
# the hellos of ranks 1..5 and then the traceback, which ends up in the job's history.
import sys

for rank in range(1, 6):
    print("Hello from rank", rank, flush=True)
raise RuntimeError("simulated error")
