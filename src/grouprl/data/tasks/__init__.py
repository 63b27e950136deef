"""Built-in offline tasks: generated problems with exact answers, no downloads."""

from grouprl.data.tasks import (
    arith,  # noqa: F401  (registers "arith")
    clinical,  # noqa: F401  (registers "clinical")
    tools,  # noqa: F401  (registers "tools")
)
from grouprl.data.tasks.base import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
