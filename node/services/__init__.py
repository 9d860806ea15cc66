"""The node's use cases, shared by the API's routes, the web console and the CLI.

Front ends call these functions; these call the repository (:mod:`node.db`), the runtime
(:mod:`node.runtime`) and the model. Every admin action is audited in the same transaction
as its change; model tasks are audited with UIDs only, never text or patient data.

Modules: :mod:`~node.services.context` (what a use case needs), :mod:`~node.services.errors`
(the errors front ends map to statuses), :mod:`~node.services.jobs`,
:mod:`~node.services.tokens`, :mod:`~node.services.health`,
:mod:`~node.services.destinations`, :mod:`~node.services.images` (image input and output)
and :mod:`~node.services.tasks` (the model's tasks on demand).
"""
