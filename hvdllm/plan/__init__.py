"""`hvdllm plan` and `hvdllm calibrate`: choose a layout from a cost model (docs/planning.md)."""

from hvdllm.plan.cluster import PRESETS, Cluster, load_cluster, with_links
from hvdllm.plan.cost import CostModel, Estimate
from hvdllm.plan.report import Plan, make_plan, plan_text
from hvdllm.plan.space import Candidate, candidates

__all__ = ["PRESETS", "Candidate", "Cluster", "CostModel", "Estimate", "Plan", "candidates",
           "load_cluster", "make_plan", "plan_text", "with_links"]
