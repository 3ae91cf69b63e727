"""SGD with momentum, dampening and Nesterov, with torch.optim.SGD's semantics.
Nesterov momentum: Sutskever et al., 2013, http://proceedings.mlr.press/v28/sutskever13.html

    d <- -g if maximize else g;  d <- d + wd * p
    with_momentum:  b <- d on the first step, else momentum * b + (1 - dampening) * d
                    d <- d + momentum * b if nesterov else b
    p <- p - lr * d

``with_momentum`` is a static option: without it the rule keeps no state, as torch.optim.SGD with
momentum=0. :class:`fusedopt.SGD` sets it from the momentum you pass.
"""

from ..dsl import eq, rule, state, where


@rule("sgd")
def sgd(p, g, t, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
        nesterov=False, maximize=False, with_momentum=False):
    d = -g if maximize else g
    d = d + weight_decay * p
    if with_momentum:
        b = state("momentum_buffer")
        b.set(where(eq(t, 1), d, momentum * b + (1 - dampening) * d))
        d = d + momentum * b if nesterov else b
    p.set(p - lr * d)
