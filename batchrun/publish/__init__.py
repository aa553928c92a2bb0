"""Publishing a job's output to the Hugging Face Hub as a dataset repo (docs/hub.md).

One responsibility per module: ``names`` (the checks made before anything is read), ``layout``
(where shards go in the repo, and what a push must add or delete), ``card_facts`` (what the card says,
from the output folder), ``card`` (rendering the card while keeping the user's words), and
``commit`` (the read-plan-commit loop, its retries, and the local record).

``push_output(output, Target(repo=...))`` is the whole of it; ``batchrun push`` and
``output.push_to_hub`` both call it, through huggingface_hub's own ``HfApi``.
"""

from typing import TYPE_CHECKING

from batchrun.lazy import lazy_attributes
from batchrun.publish.names import failed_config_name, name_problem, repo_problem

if TYPE_CHECKING:
    from batchrun.publish.commit import Pacing, PublishError, PushResult, push_output
    from batchrun.publish.layout import Target

# pyarrow, datasets and huggingface_hub load on first use: the spec parser only needs the names.
_LAZY = {
    "Pacing": "batchrun.publish.commit",
    "PublishError": "batchrun.publish.commit",
    "PushResult": "batchrun.publish.commit",
    "push_output": "batchrun.publish.commit",
    "Target": "batchrun.publish.layout",
}
__getattr__ = lazy_attributes(globals(), _LAZY)

__all__ = [
    "Pacing",
    "PublishError",
    "PushResult",
    "Target",
    "failed_config_name",
    "name_problem",
    "push_output",
    "repo_problem",
]
