"""The paper's math, pure functions over tensors: schedules σ(t), s(t); preconditioning;
the loss family; the ODE/SDE solvers; exact and guided denoisers; likelihood."""
