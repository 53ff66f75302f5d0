"""The one table from task to handler; start-up, V2 metadata and tests all read it."""

from __future__ import annotations

from handlers.base import PredictiveHandler
from handlers.fill_mask import FillMaskHandler
from handlers.rerank import RerankHandler
from handlers.sequence_classification import SequenceClassificationHandler
from handlers.text_embedding import TextEmbeddingHandler
from handlers.token_classification import TokenClassificationHandler
from settings.tasks import Task, TaskError

PREDICTIVE_HANDLERS: dict[Task, type[PredictiveHandler]] = {
    handler.task: handler
    for handler in (
        SequenceClassificationHandler,
        TokenClassificationHandler,
        FillMaskHandler,
        TextEmbeddingHandler,
        RerankHandler,
    )
}


def handler_class_for(task: Task) -> type[PredictiveHandler]:
    try:
        return PREDICTIVE_HANDLERS[task]
    except KeyError:
        served = ", ".join(t.value for t in PREDICTIVE_HANDLERS)
        raise TaskError(f"task '{task.value}' has no handler yet; served tasks: {served}") from None
