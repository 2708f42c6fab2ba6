"""The Gantt chart's segments (course_lib.viz.gantt_segments): what notebook 05 draws."""

from course_lib.serving.engine import StepRecord
from course_lib.viz import gantt_segments

SHARED = "decode, step shared with a prefill"


def test_each_step_is_its_own_segment_and_a_prefill_step_stalls_its_decodes():
    """A decodes alone (0.25 s steps), then B's long prompt shares a 2 s step with A's decode,
    then both decode. A's decode in the long step is its own 2 s segment, marked as a stall."""
    steps = [StepRecord(1.0, 1.25, [("A", 5)]), StepRecord(1.25, 1.5, [("A", 1)]),
             StepRecord(1.5, 3.5, [("A", 1), ("B", 300)]),
             StepRecord(3.5, 3.75, [("A", 1), ("B", 1)])]
    seg = gantt_segments(steps)  # seconds from the first step's start
    slot_a, slot_b = 0, 1
    assert seg["prefill"][slot_a] == [(0.0, 0.25)] and seg["prefill"][slot_b] == [(0.5, 2.0)]
    assert seg[SHARED] == {slot_a: [(0.5, 2.0)]}  # the stall the prefill caused A
    assert seg["decode"][slot_a] == [(0.25, 0.25), (2.5, 0.25)] and seg["decode"][slot_b] == [(2.5, 0.25)]
    assert not seg["idle"] and not seg["waiting"]


def test_idle_and_waiting_slots_and_step_axis():
    """Static batching's finished rows are idle; a running request a step skips is waiting."""
    steps = [StepRecord(0.0, 1.0, [("A", 4), ("B", 4)]), StepRecord(1.0, 1.5, [("B", 1)], idle=["A"]),
             StepRecord(1.5, 2.0, [("A", 1)]), StepRecord(2.0, 2.5, [("A", 1), ("B", 1)])]
    seg = gantt_segments(steps, x="step")
    assert seg["idle"][0] == [(1, 1.0)]
    assert seg["waiting"][1] == [(2, 1.0)]
    assert seg["decode"][0] == [(2, 1.0), (3, 1.0)] and seg["decode"][1] == [(1, 1.0), (3, 1.0)]
