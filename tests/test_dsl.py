"""The rule DSL: the IR it builds, equality and keys of programs, and errors at definition time."""

from __future__ import annotations

import pytest
import sympy
import torch

import fusedopt
from fusedopt import ir
from fusedopt.dsl import Rule, RuleError, eq, lerp, maximum, rule, sign, sqrt, state, where
from fusedopt.optimizers import adam, adamw, lion, sgd

S = sympy.Symbol


# ---- the IR it builds ----------------------------------------------------------------------------

def test_adamw_builds_the_expected_program():
    prog = adamw.program()
    assert prog.name == "adamw"
    assert prog.hparams == ("lr", "beta1", "beta2", "eps", "weight_decay")
    assert prog.defaults == (1e-3, 0.9, 0.999, 1e-8, 1e-2)
    assert prog.options == (("amsgrad", False), ("maximize", False))
    assert prog.states == (ir.StateSpec("exp_avg", "zeros", "fp32"), ir.StateSpec("exp_avg_sq", "zeros", "fp32", nonnegative=True))
    assert [t for t, _ in prog.updates] == ["p", "exp_avg", "exp_avg_sq"]

    p, g, t, m, v = S("p"), S("g"), S("t"), S("exp_avg"), S("exp_avg_sq")
    lr, b1, b2, eps, wd = S("lr"), S("beta1"), S("beta2"), S("eps"), S("weight_decay")
    m_new = m + (1 - b1) * (g - m)
    v_new = b2 * v + (1 - b2) * g * g
    p_new = p * (1 - lr * wd) - lr / (1 - b1**t) * m_new / (sqrt(v_new) / sqrt(1 - b2**t) + eps)
    # reads after a set see the new value: p's update holds the new m and v, inlined
    assert sympy.expand(prog.update_of("exp_avg") - m_new) == 0
    assert sympy.expand(prog.update_of("exp_avg_sq") - v_new) == 0
    assert sympy.simplify(prog.update_of("p") - p_new) == 0
    assert prog.update_of("p").has(sympy.Symbol("exp_avg")) and not prog.update_of("p").has(S("max_exp_avg_sq"))


def test_static_options_select_branches_in_python():
    plain, ams = adam.program(), adam.program(amsgrad=True)
    assert plain.state_names == ("exp_avg", "exp_avg_sq")
    assert ams.state_names == ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert ams.update_of("max_exp_avg_sq").has(sympy.Max)
    assert dict(ams.options)["amsgrad"] is True
    maximized = adam.program(maximize=True).update_of("exp_avg")
    assert sympy.expand(maximized.subs(S("g"), -S("g")) - plain.update_of("exp_avg")) == 0
    assert sgd.program().states == ()
    assert sgd.program(with_momentum=True).state_names == ("momentum_buffer",)
    assert sgd.program(with_momentum=True).update_of("momentum_buffer").has(sympy.Piecewise)


def test_lion_updates_momentum_after_the_parameter_from_the_old_momentum():
    prog = lion.program()
    p_update = prog.update_of("p")
    assert p_update.has(sympy.sign)
    # the parameter step reads the old m: no beta2 in it
    assert not p_update.has(S("beta2"))
    assert prog.update_of("exp_avg").has(S("beta2"))


def test_program_text_is_readable_and_complete():
    text = adamw.program().text()
    assert text.startswith("rule adamw\n")
    for fragment in ("hparam lr = 0.001", "option amsgrad = False", "state exp_avg: init=zeros dtype=fp32",
                     "p <- ", "exp_avg_sq <- "):
        assert fragment in text
    assert "exp_avg <- " in adamw.program().pretty()


# ---- equality, hashing, keys ---------------------------------------------------------------------

def _momentum_rule(name="mom", beta=0.9, scale=1.0):
    def fn(p, g, t, lr=0.1, beta=beta):
        b = state("buf")
        b.set(beta * b + g)
        p.set(p - lr * scale * b)
    return Rule(name, fn)


def test_equal_rules_give_equal_programs_hashes_and_keys():
    one, two = _momentum_rule(), _momentum_rule()
    assert one is not two and one.fn is not two.fn
    a, b = one.program(), two.program()
    assert a == b
    assert hash(a) == hash(b)
    assert a.key() == b.key()
    assert a.text() == b.text()
    assert len({a, b}) == 1


@pytest.mark.parametrize("change", [
    {"name": "other"},  # same body, other name
    {"beta": 0.95},  # another default
    {"scale": 2.0},  # another body
])
def test_different_rules_give_different_programs_and_keys(change):
    base, other = _momentum_rule().program(), _momentum_rule(**change).program()
    assert base != other
    assert base.key() != other.key()


def test_options_give_different_programs_and_keys():
    keys = {adam.program(amsgrad=a, maximize=m).key() for a in (False, True) for m in (False, True)}
    assert len(keys) == 4


def test_program_is_built_once_per_option_choice():
    assert adam.program() is adam.program()
    assert adam.program(amsgrad=True) is adam.program(amsgrad=True)


def test_state_may_be_set_to_a_plain_symbol():
    @rule("keep_grad")
    def keep_grad(p, g, t, lr=0.1):
        prev = state("prev")
        prev.set(g)  # a bare symbol is an expression, not a condition
        p.set(p - lr * g)

    assert keep_grad.program().update_of("prev") == S("g")


# ---- misuse raises RuleError at definition time, naming the rule, the offending name and a fix ----

def _assert_rule_error(excinfo, rule_name: str, *names: str) -> None:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, fusedopt.RuleError)
    assert f"'{rule_name}'" in msg, msg
    for name in names:
        assert name in msg, msg
    assert "Fix" in msg, msg


def test_setting_a_state_twice_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("twice_state")
        def f(p, g, t, lr=0.1):
            m = state("exp_avg")
            m.set(g)
            m.set(2 * g)
            p.set(p - lr * m)
    _assert_rule_error(excinfo, "twice_state", "exp_avg", "set twice")


def test_setting_p_twice_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("twice_p")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * g)
            p.set(p - lr * g)
    _assert_rule_error(excinfo, "twice_p", "'p'", "set twice")


def test_reading_an_undeclared_name_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("undeclared")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * g * sympy.Symbol("foo"))
    _assert_rule_error(excinfo, "undeclared", "foo")


@pytest.mark.parametrize("reserved", ["step", "param", "grad", "params", "lr_scheduler", "_private"])
def test_hyperparameter_shadowing_a_reserved_name_is_an_error(reserved):
    ns: dict = {}
    exec(f"def f(p, g, t, {reserved}=1.0):\n    p.set(p - {reserved} * g)", {}, ns)
    with pytest.raises(RuleError) as excinfo:
        Rule("shadow", ns["f"])
    _assert_rule_error(excinfo, "shadow", reserved, "reserved")


@pytest.mark.parametrize("name", ["p", "g", "t", "step", "lr", "_hidden"])
def test_state_shadowing_a_reserved_name_or_hyperparameter_is_an_error(name):
    with pytest.raises(RuleError) as excinfo:
        @rule("shadow_state")
        def f(p, g, t, lr=0.1):
            s = state(name)
            s.set(g)
            p.set(p - lr * s)
    _assert_rule_error(excinfo, "shadow_state", f"'{name}'")


@pytest.mark.parametrize("default", ["a", [1], None, (0.9, 0.99)])
def test_non_numeric_default_is_an_error(default):
    def f(p, g, t, lr=default):
        p.set(p - g)
    with pytest.raises(RuleError) as excinfo:
        Rule("bad_default", f)
    _assert_rule_error(excinfo, "bad_default", "lr", repr(default))


def test_hyperparameter_without_default_is_an_error():
    def f(p, g, t, lr):
        p.set(p - lr * g)
    with pytest.raises(RuleError) as excinfo:
        Rule("no_default", f)
    _assert_rule_error(excinfo, "no_default", "lr")


def test_signature_must_start_with_p_g_t():
    def f(param, grad, step, lr=0.1):
        param.set(param - lr * grad)
    with pytest.raises(RuleError) as excinfo:
        Rule("bad_head", f)
    _assert_rule_error(excinfo, "bad_head", "(p, g, t")


def test_state_declared_but_never_set_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("unset_state")
        def f(p, g, t, lr=0.1):
            state("exp_avg")
            p.set(p - lr * g)
    _assert_rule_error(excinfo, "unset_state", "exp_avg", "never set")


def test_never_setting_p_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("no_p")
        def f(p, g, t, lr=0.1):
            m = state("exp_avg")
            m.set(g)
    _assert_rule_error(excinfo, "no_p", "never sets p")


def test_where_with_a_python_bool_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("python_bool")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * where(t == 1, g, 2 * g))  # t == 1 would compare symbols: False
    _assert_rule_error(excinfo, "python_bool", "`==`", "where(eq(t, 1), a, b)")


@rule("where_of_where")
def where_of_where(p, g, t, lr=0.1, beta=0.5):
    m = state("m")
    m.set(where(eq(t, 1), g, where(g > 0, m, beta * m + g)))  # read below: a where() in a condition
    p.set(p - lr * where(eq(m, 0), 1, where(m > p, m, -m)))


def test_a_condition_on_a_where_value_runs_on_both_backends_as_written():
    """Comparing a value made by where() is split by cases (sympy alone would build an ITE, which
    no backend runs); both backends follow the rule as a plain torch loop does."""
    from kernel_check import any_kernel_device

    device = any_kernel_device()
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(300, generator=gen)
    grads = [torch.where(torch.rand(300, generator=gen) < 0.2, 0.0, torch.randn(300, generator=gen))
             for _ in range(4)]
    p, m = start.double().clone(), torch.zeros(300, dtype=torch.float64)
    for k, g in enumerate(grads, start=1):
        g = g.double()
        m = g if k == 1 else torch.where(g > 0, m, 0.5 * m + g)
        p = p - 0.1 * torch.where(m == 0, torch.ones_like(m), torch.where(m > p, m, -m))
    finals = []
    for backend, where_ in (("reference", "cpu"), ("triton", device)):
        q = start.clone().to(where_).requires_grad_()
        opt = fusedopt.FusedOptimizer([q], where_of_where, backend=backend)
        for g in grads:
            q.grad = g.to(where_)
            opt.step()
        finals.append(q.detach().cpu())
    assert torch.equal(finals[0], finals[1])
    torch.testing.assert_close(finals[0].double(), p, rtol=1e-6, atol=1e-6)
    assert not where_of_where.program().pretty().count("ITE")


def test_chained_comparisons_of_where_values_stop_with_a_rule_error():
    """Splitting by cases copies both branches, so a chain of where() values each compared in the
    next condition grows exponentially: past a bound the rule is refused at definition, quickly."""
    def chain(n):
        @rule(f"chain{n}")
        def f(p, g, t, lr=0.1):
            x = g
            for _ in range(n):
                x = where(x > p, x - 1, x + 1)
            p.set(p - lr * x)
        return f

    assert chain(3).program().pretty()
    with pytest.raises(RuleError, match="nested too deeply"):
        chain(4)


def _python_branch(p, g, t, lr, wd):
    if wd == 0:
        p.set(p - lr * g)
    else:
        p.set(p - 100 * lr * g)


def _python_truth(p, g, t, lr, wd):
    p.set(p - lr * g * (1 + wd) if wd else p - lr * g)


def _python_ne(p, g, t, lr, wd):
    m = state("m")
    m.set(g if t != 1 else m)
    p.set(p - lr * m)


def _python_default(p, g, t, lr, wd):
    p.set(p - (lr or 1e-3) * g)


def _state_compared(p, g, t, lr, wd):
    m = state("m")
    m.set(g)
    if m == 0:
        p.set(p)
    p.set(p - lr * m)


def _param_compared(p, g, t, lr, wd):
    p.set(p - lr * g if p != 0 else p)


@pytest.mark.parametrize("body, name, shown", [
    (_python_branch, "wd", "`==` (comparing with 0)"),
    (_python_truth, "wd", "`if`/`and`/`or`/`not`"),
    (_python_ne, "t", "`!=` (comparing with 1)"),
    (_python_default, "lr", "`if`/`and`/`or`/`not`"),
    (_state_compared, "m", "`==` (comparing with 0)"),
    (_param_compared, "p", "`!=` (comparing with 0)"),
])
def test_python_control_flow_on_a_symbol_is_an_error(body, name, shown):
    """`if wd == 0:` would compare the symbol wd with 0 (False) and take one branch for every step."""
    def f(p, g, t, lr=0.1, wd=0.0):
        body(p, g, t, lr, wd)

    with pytest.raises(RuleError) as excinfo:
        rule("python_logic")(f)
    _assert_rule_error(excinfo, "python_logic", f"'{name}'", shown, "bool option")


def test_rule_code_still_compares_and_branches_on_options_and_numbers():
    """Only symbols refuse Python logic: options, Python numbers and sympy's own comparisons work,
    and the built program holds plain symbols."""
    @rule("plain_python")
    def f(p, g, t, lr=0.1, beta=0.9, nesterov=False):
        scale = 2 if nesterov == True else 1  # noqa: E712 (an option: a Python bool)
        m = state("m")
        m.set(beta * m + g if scale == 1 else g)
        p.set(p - lr * where(eq(t, 1), g, m) * scale)

    prog = f.program()
    symbols = {s for _, e in prog.updates for s in e.free_symbols}
    assert {type(s) for s in symbols} == {sympy.Symbol}
    assert prog == f.program() and prog.key() == f.program().key()
    assert prog.update_of("m") == S("beta") * S("m") + S("g")


def test_a_math_function_on_a_symbol_points_to_the_dsl_function():
    import math

    with pytest.raises(RuleError) as excinfo:
        @rule("math_sqrt")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * math.sqrt(g))
    _assert_rule_error(excinfo, "math_sqrt", "math.sqrt", "fusedopt.dsl's sqrt")


def test_setting_g_or_a_hyperparameter_and_returning_a_value_are_errors():
    with pytest.raises(RuleError) as excinfo:
        @rule("sets_g")
        def f(p, g, t, lr=0.1):
            g.set(g * 2)
    _assert_rule_error(excinfo, "sets_g", "'g' is set", "read-only")
    with pytest.raises(RuleError) as excinfo:
        @rule("returns")
        def h(p, g, t, lr=0.1):
            p.set(p - lr * g)
            return p - lr * g
    _assert_rule_error(excinfo, "returns", "returned", "return nothing")


@pytest.mark.parametrize("name, default", [
    *((n, d) for n in ("quant_threshold", "master_weights", "sr_seed", "max_grad_norm", "clip_scale",
                       "nonfinite_flag", "state_dtype", "nonfinite", "backend") for d in (2.0, False)),
    ("clip", False), ("skip_nonfinite", True),  # options only: Rule.program's arguments
])
def test_front_end_names_are_refused_as_hyperparameters_and_options(name, default):
    """These keys mean something to every optimizer: a rule's own would be overwritten or shadowed."""
    fn = eval(f"lambda p, g, t, lr=0.1, {name}={default!r}: p.set(p - lr * g)")  # noqa: S307 (a signature)
    with pytest.raises(RuleError) as excinfo:
        rule("front_end_name")(fn)
    _assert_rule_error(excinfo, "front_end_name", f"'{name}'", "rename it")


def test_front_end_keys_are_all_reserved():
    """Every group key the front end adds (beyond the rule's own) is in FRONT_END_NAMES."""
    import torch

    from fusedopt.dsl import FRONT_END_NAMES

    opt = fusedopt.FusedOptimizer([torch.zeros(2, requires_grad=True)], adamw)
    own = set(adamw.hparams) | set(adamw.options)
    assert set(opt.defaults) - own <= FRONT_END_NAMES
    assert (set(opt.defaults) - own) >= {"quant_threshold", "state_dtype", "max_grad_norm", "sr_seed"}


@pytest.mark.parametrize("names", [("m", "m_absmax"), ("m_absmax", "m")])
def test_a_state_named_like_another_states_scales_is_an_error(names):
    with pytest.raises(RuleError) as excinfo:
        @rule("absmax_name")
        def f(p, g, t, lr=0.1):
            a, b = state(names[0]), state(names[1])
            a.set(g)
            b.set(g)
            p.set(p - lr * (a + b))
    _assert_rule_error(excinfo, "absmax_name", "'m_absmax'", "_absmax")


def test_combined_conditions_and_nested_group_reductions_are_errors():
    from fusedopt.dsl import norm

    with pytest.raises(RuleError) as excinfo:
        @rule("combined")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * where((g > 0) & (p > 0), g, 0))
    _assert_rule_error(excinfo, "combined", "combined condition", "nest where()")
    with pytest.raises(RuleError) as excinfo:
        @rule("nested_group")
        def h(p, g, t, lr=0.1):
            p.set(p - lr * g / norm(g / norm(g), over="group"))
    _assert_rule_error(excinfo, "nested_group", "another reduction", "over='tensor'")

    @rule("group_normalized")
    def k(p, g, t, lr=0.1):
        p.set(p - lr * g / norm(g, over="group"))

    with pytest.raises(RuleError, match="clip='scale'"):
        k.program(clip=True)
    assert "clip_scale" in k.program(clip="scale").hparams


def test_where_with_a_non_condition_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("not_a_condition")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * where(g, g, 2 * g))  # a symbol is not a comparison
    _assert_rule_error(excinfo, "not_a_condition", "where()", "g > 0")


def test_setting_a_comparison_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("set_comparison")
        def f(p, g, t, lr=0.1):
            p.set(g > 0)
    _assert_rule_error(excinfo, "set_comparison", "'p'", "where(")


def test_setting_a_non_expression_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("set_string")
        def f(p, g, t, lr=0.1):
            p.set("p - lr * g")
    _assert_rule_error(excinfo, "set_string", "'p'", "not an expression")


@pytest.mark.parametrize("kwargs, offending", [({"dtype": "fp16"}, "fp16"), ({"dtype": "int8"}, "int8"),
                                               ({"init": "ones"}, "ones"), ({"init": "random"}, "random")])
def test_state_with_bad_dtype_or_init_is_an_error(kwargs, offending):
    with pytest.raises(RuleError) as excinfo:
        @rule("bad_state")
        def f(p, g, t, lr=0.1):
            m = state("exp_avg", **kwargs)
            m.set(g)
            p.set(p - lr * m)
    _assert_rule_error(excinfo, "bad_state", "exp_avg", offending)


def test_duplicate_state_name_is_an_error():
    with pytest.raises(RuleError) as excinfo:
        @rule("dup_state")
        def f(p, g, t, lr=0.1):
            a = state("exp_avg")
            b = state("exp_avg")
            a.set(g)
            b.set(g)
            p.set(p - lr * a)
    _assert_rule_error(excinfo, "dup_state", "exp_avg", "declared twice", "state('exp_avg') once")


def test_an_exception_inside_the_rule_is_reported_as_a_rule_error():
    import math

    with pytest.raises(RuleError) as excinfo:
        @rule("uses_math")
        def f(p, g, t, lr=0.1):
            p.set(p - lr * math.sqrt(g))  # math.sqrt cannot take a symbol
    _assert_rule_error(excinfo, "uses_math", "TypeError")


def test_unknown_or_non_bool_options_are_errors():
    with pytest.raises(RuleError) as excinfo:
        adam.program(nesterov=True)
    _assert_rule_error(excinfo, "adam", "nesterov")
    with pytest.raises(RuleError) as excinfo:
        adam.program(amsgrad=1)
    _assert_rule_error(excinfo, "adam", "amsgrad")


def test_state_outside_a_rule_is_an_error():
    with pytest.raises(RuleError, match="@rule"):
        state("exp_avg")


def test_errors_surface_when_the_decorator_runs_not_later():
    calls = []

    def f(p, g, t, lr=0.1):
        calls.append(1)
        p.set(p - lr * g * S("undeclared_name"))
    with pytest.raises(RuleError):
        Rule("eager", f)
    assert calls == [1]  # the body ran once, inside the constructor


def test_dsl_functions_build_the_documented_expressions():
    a, b, w = S("a"), S("b"), S("w")
    assert lerp(a, b, w) == a + w * (b - a)
    assert sign(a) == sympy.sign(a)
    assert maximum(a, b) == sympy.Max(a, b)
    assert eq(a, 1) == sympy.Eq(a, 1, evaluate=False)
    assert where(a > 0, a, b) == sympy.Piecewise((a, a > 0), (b, True))


def test_nodes_sympy_introduces_that_no_backend_runs_are_rejected_at_definition():
    from fusedopt.dsl import absolute, exp

    with pytest.raises(RuleError, match=r"rule 'complex_abs'.*re.*Fix"):
        @rule("complex_abs")
        def complex_abs(p, g, t, lr=0.1):
            p.set(p - lr * absolute(exp(g) * g))


def test_symbol_free_constants_are_folded_to_floats():
    import math

    from fusedopt.dsl import exp

    @rule("constants")
    def constants(p, g, t, lr=0.1):
        p.set(p - lr * exp(-1) * g)

    (_, expr), = constants.program().updates
    floats = [a for a in expr.atoms(sympy.Float)]
    assert any(abs(float(f) + math.exp(-1)) < 1e-15 or abs(float(f) - math.exp(-1)) < 1e-15 for f in floats)
    assert not expr.has(sympy.exp)
