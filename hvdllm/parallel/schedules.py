"""Pipeline schedules as plain lists of actions per stage.

An action is ("F", i) - forward micro-batch i - or ("B", i) - backward micro-batch i. The
messages are implied: a forward on stage s > 0 first receives micro-batch i's activations from
stage s - 1, a forward on a stage before the last sends its output on; a backward on a stage
before the last first receives the gradient of its output, and a backward on stage s > 0 sends
the gradient of its input back. Sends never block (MPI Isend), so a schedule can only hang if
some stage waits for a message that its neighbour will send only after a message from it:
`simulate` checks that this never happens and counts live activations.

    GPipe, P = 2, m = 4       stage 0: F0 F1 F2 F3 B0 B1 B2 B3        m activations live
                              stage 1: F0 F1 F2 F3 B0 B1 B2 B3
    1F1B,  P = 2, m = 4       stage 0: F0 F1 B0 F2 B1 F3 B2 B3        <= P live
                              stage 1: F0 B0 F1 B1 F2 B2 F3 B3

With P = 1, 1F1B is plain gradient accumulation: F0 B0 F1 B1 ...
Idle time per stage (the bubble) is (P - 1) / (m + P - 1) of a step for both schedules.
"""

from __future__ import annotations

Action = tuple[str, int]


def gpipe(stages: int, stage: int, micro_batches: int) -> list[Action]:
    """All forwards, then all backwards."""
    return [("F", i) for i in range(micro_batches)] + [("B", i) for i in range(micro_batches)]


def one_f_one_b(stages: int, stage: int, micro_batches: int) -> list[Action]:
    """Warm up with (P - 1 - stage) forwards, then alternate one forward and one backward."""
    warmup = min(stages - stage - 1, micro_batches)
    actions: list[Action] = [("F", i) for i in range(warmup)]
    for i in range(warmup, micro_batches):
        actions += [("F", i), ("B", i - warmup)]
    actions += [("B", i) for i in range(micro_batches - warmup, micro_batches)]
    return actions


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Theoretical idle fraction of each stage: (P - 1) / (m + P - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def simulate(name: str, stages: int, micro_batches: int) -> list[int]:
    """Run every stage's action list against the message dependencies; return the peak number
    of live activations per stage. Raises RuntimeError if the schedule would deadlock."""
    plans = [SCHEDULES[name](stages, s, micro_batches) for s in range(stages)]
    done: set[tuple[int, str, int]] = set()
    pos, live, peak = [0] * stages, [0] * stages, [0] * stages
    while any(pos[s] < len(plans[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(plans[s]):
                continue
            kind, i = plans[s][pos[s]]
            ready = ((kind == "F" and (s == 0 or (s - 1, "F", i) in done)) or
                     (kind == "B" and (s, "F", i) in done and
                      (s == stages - 1 or (s + 1, "B", i) in done)))
            if ready:
                done.add((s, kind, i))
                live[s] += 1 if kind == "F" else -1
                peak[s] = max(peak[s], live[s])
                pos[s] += 1
                progressed = True
        if not progressed:
            waiting = {s: plans[s][pos[s]] for s in range(stages) if pos[s] < len(plans[s])}
            raise RuntimeError(f"{name} deadlocks at P={stages}, m={micro_batches}: {waiting}")
    return peak
