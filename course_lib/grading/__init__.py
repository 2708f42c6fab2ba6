"""Checks for the exercise notebooks, and the task list a grader runs.

In a notebook, a self-check cell calls one check with the learner's function or class::

    from course_lib.grading import check_symmetric_quantize
    check_symmetric_quantize(symmetric_quantize)
    # ✓ symmetric quantize: passed (2/2 points)

A check prints one line, returns a :class:`CheckResult`, and raises ``AssertionError`` when the
answer is wrong (pass ``raise_on_fail=False`` to only get the result). A function that still
raises ``NotImplementedError`` is reported as "not implemented yet"; any other exception the
learner's code raises is reported with its type and message, never as a crash of the check.

:data:`TASKS` lists every graded task: which notebook, which names the learner defines there,
the check and its points. :func:`grade` runs the tasks of a notebook on a namespace (e.g. the
globals of an executed submission).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from course_lib.grading.checks import (
    check_asymmetric_quantize,
    check_conv1d_to_linear,
    check_dequantize,
    check_int8_linear,
    check_minmax_observer,
    check_pack_int4,
    check_per_group_quantize,
    check_smooth_rmsnorm_group,
    check_symmetric_quantize,
)
from course_lib.grading.checks_batching import check_request_metrics, check_schedule_step
from course_lib.grading.checks_generation import (
    check_accept_or_resample,
    check_cached_attention,
    check_cached_generation,
    check_expected_speedup,
)
from course_lib.grading.checks_gptq import (
    check_accumulate_hessian,
    check_awq_scale_search,
    check_gptq_column_step,
)
from course_lib.grading.checks_kernels import check_int4_dequantize_kernel
from course_lib.grading.checks_paged import (
    check_block_allocator,
    check_paged_attention,
    check_slot_mapping,
)
from course_lib.grading.checks_serving import (
    check_choose_deployment,
    check_cost,
    check_latency_metrics,
    check_request_validator,
)
from course_lib.grading.core import CheckResult

__all__ = [
    "TASKS",
    "CheckResult",
    "Task",
    "check_accept_or_resample",
    "check_accumulate_hessian",
    "check_asymmetric_quantize",
    "check_awq_scale_search",
    "check_block_allocator",
    "check_cached_attention",
    "check_cached_generation",
    "check_choose_deployment",
    "check_conv1d_to_linear",
    "check_cost",
    "check_dequantize",
    "check_expected_speedup",
    "check_gptq_column_step",
    "check_int4_dequantize_kernel",
    "check_int8_linear",
    "check_latency_metrics",
    "check_minmax_observer",
    "check_pack_int4",
    "check_paged_attention",
    "check_per_group_quantize",
    "check_request_metrics",
    "check_request_validator",
    "check_schedule_step",
    "check_slot_mapping",
    "check_smooth_rmsnorm_group",
    "check_symmetric_quantize",
    "grade",
    "grade_task",
    "total_points",
]


@dataclass(frozen=True)
class Task:
    """One graded exercise: the notebook it is in, the names it defines, and its check."""

    notebook: str
    names: tuple[str, ...]  # what the learner defines, passed to the check in this order
    check: Callable[..., CheckResult]

    @property
    def points(self) -> int:
        return self.check.points


TASKS: dict[str, Task] = {
    "01.symmetric_quantize": Task("01_quantization_math", ("symmetric_quantize",),
                                  check_symmetric_quantize),
    "01.dequantize": Task("01_quantization_math", ("dequantize",), check_dequantize),
    "01.asymmetric_quantize": Task("01_quantization_math", ("asymmetric_quantize",),
                                   check_asymmetric_quantize),
    "01.per_group_quantize": Task("01_quantization_math", ("per_group_quantize",),
                                  check_per_group_quantize),
    "01.pack_int4": Task("01_quantization_math", ("pack_int4", "unpack_int4"), check_pack_int4),
    "02.minmax_observer": Task("02_post_training_quantization", ("MinMaxObserver",),
                               check_minmax_observer),
    "02.int8_linear": Task("02_post_training_quantization", ("Int8Linear",), check_int8_linear),
    "02.conv1d_to_linear": Task("02_post_training_quantization", ("conv1d_to_linear",),
                                check_conv1d_to_linear),
    "02.smooth_rmsnorm_group": Task("02_post_training_quantization", ("smooth_rmsnorm_group",),
                                    check_smooth_rmsnorm_group),
    "02.int4_dequantize_kernel": Task("02_post_training_quantization", ("dequantize_int4",),
                                      check_int4_dequantize_kernel),
    "03.accumulate_hessian": Task("03_gptq_awq", ("accumulate_hessian",), check_accumulate_hessian),
    "03.gptq_column_step": Task("03_gptq_awq", ("quantize_column_and_propagate",),
                                check_gptq_column_step),
    "03.awq_scale_search": Task("03_gptq_awq", ("awq_search_ratio",), check_awq_scale_search),
    "04.cached_attention": Task("04_kv_cache", ("cached_attention",), check_cached_attention),
    "04.generate_with_cache": Task("04_kv_cache", ("generate_with_cache",), check_cached_generation),
    "05.schedule_step": Task("05_continuous_batching", ("schedule_step",), check_schedule_step),
    "05.request_metrics": Task("05_continuous_batching", ("request_metrics",),
                               check_request_metrics),
    "06.block_allocator": Task("06_paged_attention", ("BlockAllocator",), check_block_allocator),
    "06.slot_mapping": Task("06_paged_attention", ("slot_mapping",), check_slot_mapping),
    "06.paged_attention": Task("06_paged_attention", ("paged_attention",), check_paged_attention),
    "07.accept_or_resample": Task("07_speculative_decoding", ("accept_or_resample",),
                                  check_accept_or_resample),
    "07.expected_speedup": Task("07_speculative_decoding", ("expected_speedup",),
                                check_expected_speedup),
    "08.latency_metrics": Task("08_deployment_and_cost", ("request_latency", "goodput"),
                               check_latency_metrics),
    "08.cost": Task("08_deployment_and_cost", ("cost_per_million_tokens",), check_cost),
    "08.request_validator": Task("08_deployment_and_cost", ("validate_completion",),
                                 check_request_validator),
    "09.choose_deployment": Task("09_end_to_end", ("choose_deployment",), check_choose_deployment),
}


def total_points(notebook: str | None = None) -> int:
    """Points available in one notebook (by stem, e.g. "01_quantization_math"), or in all."""
    return sum(t.points for t in TASKS.values() if notebook in (None, t.notebook))


def grade_task(task_id: str, namespace: Mapping[str, object],
               hidden_seed: int | None = None) -> CheckResult:
    """Run one task (e.g. "01.pack_int4") on the learner's definitions found in ``namespace``.

    A name the learner never defined gives status "missing" (0 points); nothing raises.
    """
    task = TASKS[task_id]
    missing = [name for name in task.names if name not in namespace]
    if missing:
        result = CheckResult(task.check.task_name, False, 0, task.points,
                             f"{', '.join(missing)} is not defined", "missing")
        print(result)
        return result
    return task.check(*(namespace[name] for name in task.names), raise_on_fail=False,
                      hidden_seed=hidden_seed)


def grade(namespace: Mapping[str, object], notebook: str,
          hidden_seed: int | None = None) -> list[CheckResult]:
    """Run every task of ``notebook`` on the learner's definitions found in ``namespace``."""
    return [grade_task(task_id, namespace, hidden_seed)
            for task_id, task in TASKS.items() if task.notebook == notebook]
