"""Statistics: the observers the instrument pass inserts, and what they sum: input norms,
Hessians (``hessian``), diversity (``diversity``), attention, and token selection (``tokens``,
AMIA in ``amia``)."""
