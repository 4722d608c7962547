"""ARC solvers and the gate that picks one per task (issue 18, part 5).

After "Neural networks for abstraction and reasoning: Towards broad generalization in
machines" (Bober-Irizar & Banerjee, arXiv 2402.03507): different solvers solve different ARC
tasks, so an ensemble beats each. The solvers here run on a CPU: a depth-limited DSL program
search (:class:`ProgramSearch`), a CNN trained per task at test time on augmented demos
(:class:`TestTimeCNN`), and trivial baselines (:class:`Identity`, :class:`CommonOutput`);
:class:`SolverGate` picks one per task from the demos alone.
"""

from .base import ATTEMPTS, Solver, SolveResult, hits, leave_one_out, solved
from .baselines import CommonOutput, Identity
from .dsl import ProgramSearch
from .gate import SolverGate, max_fit_choice, task_features
from .grids import PRIMITIVES, components, learn_colour_map
from .neural import CellCNN, TestTimeCNN, dihedral, same_shape_task

__all__ = [
    "ATTEMPTS",
    "PRIMITIVES",
    "CellCNN",
    "CommonOutput",
    "Identity",
    "ProgramSearch",
    "SolveResult",
    "Solver",
    "SolverGate",
    "TestTimeCNN",
    "components",
    "dihedral",
    "hits",
    "learn_colour_map",
    "leave_one_out",
    "max_fit_choice",
    "same_shape_task",
    "solved",
    "task_features",
]
