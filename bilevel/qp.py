r"""A differentiable quadratic program: ``qp(Q, q, G, h, A, b)``, batched, differentiable in every input.

    z*(Q, q, G, h, A, b) = argmin_z ½ zᵀQz + qᵀz   subject to   G z ≤ h,   A z = b.

**Forward**: a primal–dual interior-point method with Mehrotra's predictor–corrector (Mehrotra 1992; as OptNet /
qpth's ``pdipm``, Amos & Kolter 2017, https://arxiv.org/abs/1703.00443). With slacks ``s = h − Gz ≥ 0``,
inequality multipliers ``λ ≥ 0`` and equality multipliers ``ν``, each iteration takes a Newton step on

    Qz + q + Gᵀλ + Aᵀν = 0,    Gz + s − h = 0,    Az − b = 0,    s ∘ λ = σμ,

with ``μ = sᵀλ / m`` and the centring ``σ = (μ_aff / μ)³`` from an affine-scaling predictor, then steps 0.99 of
the way to the boundary of ``s, λ ≥ 0``. It stops once the three residuals are below ``tol`` (relative to
``1 + ||q||∞``, ``1 + ||h||∞``, ``1 + ||b||∞``) and ``μ ≤ tol``. Deviations from qpth: the Newton system is
assembled and solved densely (``torch.linalg.solve``, size ``n + 2m + p``) instead of qpth's block elimination
(simpler, fine for the small QPs a layer holds, cubic in the size); the loop is a masked fixed budget (``steps``)
that runs unchanged under ``vmap``; a failure is classified (infeasible, unbounded, singular) instead of returning
the last iterate.

**Backward**: the implicit function theorem on the KKT conditions at the solution ``(z*, λ*, ν*)``,

    F(z, λ, ν) = ( Q̃z + q + Gᵀλ + Aᵀν,   λ ∘ (Gz − h),   Az − b ) = 0,     Q̃ = ½(Q + Qᵀ),

complementary slackness included (OptNet's differentiated system), through ``bilevel.root_vjp`` with a dense
solve of ``(∂F/∂(z, λ, ν))ᵀ u = −(z̄, 0, 0)``. Only the symmetric part of ``Q`` enters the objective, so the
gradient in ``Q`` is symmetric. First derivatives only: the multipliers are saved as constants, so a second
derivative (``create_graph=True``, ``grad`` of ``grad``) through the layer is not that of the QP.

When the derivative exists: ``z*`` is differentiable where strict complementarity holds (every active constraint
has ``λ_i > 0``), ``Q`` is positive definite on the null space of the active constraints and those constraints are
linearly independent. Where a constraint is exactly at the boundary of becoming active (``λ_i = 0`` and
``G_i z* = h_i``) the solution map has a kink: the derivative is one-sided, and the returned gradient (that of
the interior-point solution, ``λ_i ≈ μ/s_i``) is one of the one-sided derivatives or a blend of them. The
backward solve's ``SolveInfo`` is exposed through ``record=Record()``; a near-singular KKT system there (a
degenerate or nearly dependent active set) gives a warning.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .conditions import Condition
from .diagnostics import POLICIES, NonConvergenceError, NonFiniteError, _policy
from .implicit import root_vjp
from .linear_solve import Dense
from ._host import _all_true, _cadence, _check_every_ok, _check_now, _under_vmap
from .root_find import Record, _Probe, _warn_derivative
from .types import SolveInfo


class InfeasibleError(ValueError):
    """The QP's constraints ``Gz ≤ h, Az = b`` have no solution (a Farkas certificate was found)."""


class UnboundedError(ValueError):
    """The QP's objective is unbounded below on the feasible set (a direction ``d`` with ``Qd = 0, Ad = 0,
    Gd ≤ 0, qᵀd < 0`` was found)."""


def _kkt_matrix(Q, G, A, s, lam):
    n, m, p = Q.shape[-1], G.shape[-2], A.shape[-2]
    Z = lambda r, c: Q.new_zeros(r, c)  # noqa: E731
    eye = torch.eye(m, dtype=Q.dtype, device=Q.device)
    rows = [torch.cat([Q, G.T, A.T, Z(n, m)], 1),
            torch.cat([G, Z(m, m), Z(m, p), eye], 1),
            torch.cat([A, Z(p, m), Z(p, p), Z(p, m)], 1),
            torch.cat([Z(m, n), torch.diag(s), Z(m, p), torch.diag(lam)], 1)]
    return torch.cat(rows, 0)


def _split(x, n, m, p):
    return x[:n], x[n:n + m], x[n + m:n + m + p], x[n + m + p:]


def _step_length(v, dv):
    """The largest α ≤ 1 with ``v + α dv ≥ 0`` (``v > 0``)."""
    ratio = torch.where(dv < 0, -v / torch.where(dv < 0, dv, -torch.ones_like(dv)), torch.full_like(v, float("inf")))
    return torch.clamp(ratio.amin(), max=1.0) if v.numel() else v.new_ones(())


def _inf(x):
    return x.abs().amax() if x.numel() else x.new_zeros(())


def _ipm(Q, q, G, h, A, b, steps: int, tol: float, check_every: int):
    """One QP by Mehrotra's predictor-corrector; returns ``(z, λ, ν, SolveInfo)`` (``residual``: the largest
    scaled KKT residual). The early stop is read on the host every ``check_every`` iterations (0: never)."""
    n, m, p = q.shape[-1], h.shape[-1], b.shape[-1]
    Q = (Q + Q.T) / 2
    scale_d, scale_p, scale_e = 1 + _inf(q), 1 + _inf(h), 1 + _inf(b)
    scale = torch.stack([scale_d, scale_p, scale_e, 1 + _inf(Q), 1 + _inf(G), 1 + _inf(A)]).amax()

    def residuals(z, lam, nu, s):
        rd = Q @ z + q + G.T @ lam + A.T @ nu
        return rd, G @ z + s - h, A @ z - b

    def measure(rd, rp, re, mu):
        return torch.stack([_inf(rd) / scale_d, _inf(rp) / scale_p, _inf(re) / scale_e, mu]).amax()

    # start: the KKT point of the problem with s + λ = 0 in place of s ∘ λ = 0, then shifted into s, λ > 0
    ones = q.new_ones(m)
    x = torch.linalg.solve_ex(_kkt_matrix(Q, G, A, ones, ones), torch.cat([-q, h, b, q.new_zeros(m)]))[0]
    z, lam, nu, s = _split(x, n, m, p)
    if m:
        s = s + torch.clamp(1 - s.amin(), min=0)
        lam = lam + torch.clamp(1 - lam.amin(), min=0)
    mu = (s @ lam) / max(m, 1)
    res = measure(*residuals(z, lam, nu, s), mu)
    nonfinite = ~torch.isfinite(res) | ~torch.isfinite(x).all()
    done = (res <= tol) | nonfinite
    count = torch.zeros((), dtype=torch.long, device=q.device)
    for k in range(steps):
        # the iterations between two reads are masked (`keep`): they change nothing but the time taken
        if _check_now(k, check_every) and _all_true(done):
            break
        rd, rp, re = residuals(z, lam, nu, s)
        K = _kkt_matrix(Q, G, A, s, lam)
        # predictor (affine scaling, σ = 0), then a corrector with the same matrix
        d_aff = torch.linalg.solve_ex(K, -torch.cat([rd, rp, re, s * lam]))[0]
        _, dl_aff, _, ds_aff = _split(d_aff, n, m, p)
        a_aff = torch.minimum(_step_length(s, ds_aff), _step_length(lam, dl_aff))
        mu_aff = ((s + a_aff * ds_aff) @ (lam + a_aff * dl_aff)) / max(m, 1)
        sigma = (mu_aff / torch.where(mu > 0, mu, torch.ones_like(mu))) ** 3
        d = torch.linalg.solve_ex(K, -torch.cat([rd, rp, re, s * lam + ds_aff * dl_aff - sigma * mu]))[0]
        dz, dl, dn, ds = _split(d, n, m, p)
        alpha = torch.clamp(0.99 * torch.minimum(_step_length(s, ds), _step_length(lam, dl)), max=1.0)
        new = (z + alpha * dz, lam + alpha * dl, nu + alpha * dn, s + alpha * ds)
        bad = ~torch.isfinite(d).all()
        keep = done | bad
        z, lam, nu, s = (torch.where(keep, old, x) for old, x in zip((z, lam, nu, s), new))
        nonfinite = nonfinite | (bad & ~done)
        count = count + (~keep).long()
        mu = (s @ lam) / max(m, 1)
        res = torch.where(keep, res, measure(*residuals(z, lam, nu, s), mu))
        # iterates running off to infinity: an infeasible (multipliers) or unbounded (z) problem; stop while the
        # direction they run along can still be read without overflow, and let the caller classify it
        size = torch.stack([_inf(z), _inf(lam), _inf(nu)]).amax()
        done = done | bad | (res <= tol) | (size > 1e12 * scale)
    return z, lam, nu, SolveInfo(count, res, (res <= tol) & ~nonfinite, nonfinite, torch.zeros_like(nonfinite))


def _kkt_residual(Q, q, G, h, A, b, z, lam, nu):
    Qs = (Q + Q.T) / 2
    out = {"z": Qs @ z + q + G.T @ lam + A.T @ nu}
    if lam.numel():
        out["lam"] = lam * (G @ z - h)
    if nu.numel():
        out["nu"] = A @ z - b
    return out


class _QP(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(options, Q, q, G, h, A, b):
        z, lam, nu, info = _ipm(Q, q, G, h, A, b, options["steps"], options["tol"], options["check_every"])
        return z, lam, nu, *info[:5]  # the five tensor fields every solver fills

    @staticmethod
    def setup_context(ctx, inputs, output):
        options, *data = inputs
        ctx.options = options
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*data, *output[:3])

    @staticmethod
    def backward(ctx, z_bar, *_):
        Q, q, G, h, A, b, z, lam, nu = ctx.saved_tensors
        data = [Q, q, G, h, A, b]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        if not wanted:
            return (None,) * 7
        params = {"z": z, "lam": lam, "nu": nu}
        params = {k: v for k, v in params.items() if k == "z" or v.numel()}

        def kkt(w, hp, batch):
            full = list(data)
            for key, value in hp.items():
                full[int(key)] = value
            return _kkt_residual(*full, w["z"], w.get("lam", lam), w.get("nu", nu))

        cotangent = {k: (z_bar if k == "z" else torch.zeros_like(v)) for k, v in params.items()}
        probe = _Probe(ctx.options["backward"])
        grads, info, residual = root_vjp(Condition(kkt, False, "qp KKT"), params, {str(i): data[i] for i in wanted},
                                         None, cotangent, probe)
        record: Optional[Record] = ctx.options["record"]
        if record is not None:
            record.backward = info
        out = [None] * 6
        for key, value in grads.items():
            out[int(key)] = value
        if not _under_vmap():
            _check_backward(info, out)
            _warn_derivative("qp backward", probe, float(torch.linalg.vector_norm(torch.cat(
                [v.detach().reshape(-1) for v in residual.values()]))), float(torch.linalg.vector_norm(z)), z.dtype)
        return (None, *out)


def _check_backward(info: SolveInfo, grads):
    finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    if not finite or bool(info.nonfinite.any()):
        raise NonFiniteError("qp backward: the KKT system at the solution is singular (NaN or inf in the gradient): "
                             "a degenerate active set (a constraint active with a zero multiplier), linearly "
                             "dependent active constraints, or Q singular on their null space.")


def qp(Q: Tensor, q: Tensor, G: Optional[Tensor] = None, h: Optional[Tensor] = None, A: Optional[Tensor] = None,
       b: Optional[Tensor] = None, *, steps: int = 50, tol: Optional[float] = None, check_every: Optional[int] = None,
       backward=None, on_nonconvergence: str = "raise", on_nonfinite: str = "raise", return_info: bool = False,
       record: Optional[Record] = None):
    r"""``z* = argmin_z ½zᵀQz + qᵀz  s.t.  Gz ≤ h, Az = b``, differentiable in every input.

    The method, its derivative and when that derivative is one-sided are in the module docstring (``bilevel.qp``).

    Args:
        Q: ``(..., n, n)``, symmetric positive semidefinite (only ``½(Q + Qᵀ)`` is used); positive definite on the
            null space of the active constraints for a unique solution and a derivative.
        q: ``(..., n)``.
        G, h: ``(..., m, n)`` and ``(..., m)``, the inequalities ``Gz ≤ h``; both ``None`` for none.
        A, b: ``(..., p, n)`` and ``(..., p)``, the equalities ``Az = b`` (``A`` of full row rank); both ``None``
            for none.
        steps: budget of interior-point iterations (each: one dense solve of size ``n + 2m + p``, factored once
            and used twice).
        tol: stop when every scaled KKT residual and ``μ`` are below it (default ``1e-10`` in float64, ``1e-5``
            in float32).
        check_every: read that stop on the host (a device-to-host synchronisation on an accelerator) every
            ``check_every`` iterations, for the whole batch at once; ``0`` never (all ``steps`` run); ``None``: 1 on
            the CPU, 8 elsewhere. The iterations between two reads are masked: the result is the same for every
            value.
        backward: the linear solver for the adjoint KKT system (default ``Dense()``: exact); e.g. ``GMRES()``.
        on_nonconvergence: ``"raise" | "warn" | "ignore"`` when the budget ends before ``tol`` for a QP that was
            neither found infeasible nor unbounded.
        on_nonfinite: the same for NaN/inf (a singular KKT system).
        return_info: also return the forward ``SolveInfo`` (``residual`` is the largest scaled KKT residual).
        record: a ``bilevel.layers.Record`` that receives the forward and (after ``backward()``) the backward
            ``SolveInfo``.

    Returns:
        ``z*`` of shape ``(..., n)`` (with ``...`` the broadcast batch shape of the inputs), and the ``SolveInfo``
        if ``return_info``.

    Raises:
        InfeasibleError: no ``z`` satisfies the constraints (checked outside ``vmap``).
        UnboundedError: the objective is unbounded below on the feasible set.

    Example:
        >>> import torch
        >>> from bilevel.layers import qp
        >>> Q, q = torch.eye(2, dtype=torch.float64), torch.tensor([-2.0, -2.0], dtype=torch.float64)
        >>> G, h = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64, requires_grad=True)
        >>> z = qp(Q, q, G, h)          # the projection of (2, 2) onto z₁ + z₂ ≤ 1
        >>> torch.allclose(z, torch.tensor([0.5, 0.5], dtype=torch.float64))
        True
        >>> z.sum().backward(); round(float(h.grad), 6)  # the constraint is active: z₁ + z₂ moves with h
        1.0
    """
    for name, x in (("Q", Q), ("q", q)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"qp: {name} must be a floating-point Tensor, got {got}.")
    if (G is None) != (h is None) or (A is None) != (b is None):
        raise ValueError("qp: give G and h together (inequalities Gz <= h) and A and b together (equalities Az = b), "
                         "or leave both of a pair None.")
    for key, value in (("on_nonconvergence", on_nonconvergence), ("on_nonfinite", on_nonfinite)):
        if value not in POLICIES:
            raise ValueError(f"qp({key}={value!r}): must be one of {POLICIES}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"qp(steps={steps!r}): must be an int >= 1.")
    if not _check_every_ok(check_every):
        raise ValueError(f"qp(check_every={check_every!r}): must be None or an int >= 0.")
    n = q.shape[-1] if q.dim() else 0
    if q.dim() < 1 or Q.dim() < 2 or Q.shape[-2:] != (n, n):
        raise ValueError(f"qp: Q must be (..., n, n) and q (..., n); got Q {tuple(Q.shape)}, q {tuple(q.shape)}.")
    dtype = torch.promote_types(Q.dtype, q.dtype)
    G = q.new_zeros(0, n, dtype=dtype) if G is None else G
    h = q.new_zeros(0, dtype=dtype) if h is None else h
    A = q.new_zeros(0, n, dtype=dtype) if A is None else A
    b = q.new_zeros(0, dtype=dtype) if b is None else b
    for name, mat, vec, what in (("G, h", G, h, "m"), ("A, b", A, b, "p")):
        if not (isinstance(mat, Tensor) and isinstance(vec, Tensor)) or mat.dim() < 2 or vec.dim() < 1 or \
                mat.shape[-1] != n or mat.shape[-2] != vec.shape[-1]:
            got = tuple(getattr(mat, "shape", ())), tuple(getattr(vec, "shape", ()))
            raise ValueError(f"qp: {name} must be (..., {what}, n={n}) and (..., {what}); got {got[0]} and {got[1]}.")
    if A.shape[-2] > n:
        raise ValueError(f"qp: {A.shape[-2]} equality constraints for {n} unknowns; A must have full row rank "
                         f"(p <= n).")
    inputs = [x.to(dtype) for x in (Q, q, G, h, A, b)]
    cores = (2, 1, 2, 1, 2, 1)
    shapes = [tuple(x.shape[:x.dim() - c]) for x, c in zip(inputs, cores)]
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"qp: the batch shapes of Q, q, G, h, A, b do not broadcast: {shapes}.") from None
    eps = torch.finfo(dtype).eps
    if not _under_vmap():
        for name, x in zip("Q q G h A b".split(), inputs):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"qp: {name} contains NaN or inf.")
        # a non-convex QP has no unique minimiser the KKT conditions could pin down
        eig = torch.linalg.eigvalsh(((inputs[0] + inputs[0].transpose(-1, -2)) / 2).detach())
        worst = eig[..., 0] / eig.abs().amax(-1).clamp(min=torch.finfo(dtype).tiny)
        if bool((worst < -1e3 * eps).any()):
            raise ValueError(f"qp: Q must be positive semidefinite; its smallest eigenvalue is "
                             f"{float(eig[..., 0].min()):.3g}. Use Q = LᵀL, or add a multiple of the identity.")
    tol = max(1e-10, 1e2 * eps) if tol is None else tol
    backward = Dense() if backward is None else backward
    options = {"steps": steps, "tol": tol, "check_every": _cadence(check_every, q.device), "backward": backward,
               "record": record}
    fn = lambda *xs: _QP.apply(options, *xs)  # noqa: E731
    if batch:
        # one problem per batch entry: vmap over the flattened batch, unbatched inputs stay unbatched
        flat = [x.expand(*batch, *x.shape[x.dim() - c:]).reshape(-1, *x.shape[x.dim() - c:]) if s else x
                for x, s, c in zip(inputs, shapes, cores)]
        outs = torch.func.vmap(fn, in_dims=tuple(0 if s else None for s in shapes))(*flat)
        outs = [o.reshape(*batch, *o.shape[1:]) for o in outs]
    else:
        outs = fn(*inputs)
    z, lam, nu, *fields = outs
    info = SolveInfo(*fields)
    if record is not None:
        record.forward = info
    if not _under_vmap():
        _check_forward(inputs, z, lam, nu, info, on_nonconvergence, on_nonfinite)
    return (z, info) if return_info else z


def _check_forward(inputs, z, lam, nu, info, on_nonconvergence, on_nonfinite):
    failed = ~info.converged
    if not bool(failed.any()):
        return
    Q, q, G, h, A, b = (x.detach() for x in inputs)
    z, lam, nu = z.detach(), lam.detach(), nu.detach()
    Qs = (Q + Q.transpose(-1, -2)) / 2
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    # unbounded: the iterate runs off along d with Qd = 0, Ad = 0, Gd <= 0 and qᵀd < 0
    d = _direction(z)
    small = 1e-6
    scale = 1 + Qs.abs().amax((-1, -2))
    unbounded = ((mv(Qs, d).abs().amax(-1) <= small * scale)
                 & (_rows(mv(A, d).abs()) <= small * (1 + _entries(A)))
                 & (_rows(mv(G, d)) <= small * (1 + _entries(G)))
                 & ((q * d).sum(-1) < -small) & failed)
    # infeasible (Farkas): y = (λ, ν) ≠ 0, λ >= 0, Gᵀλ + Aᵀν = 0 and hᵀλ + bᵀν < 0; the multipliers run off along y
    y = _direction(torch.cat([lam, nu], -1))
    lh, nh = y[..., :lam.shape[-1]], y[..., lam.shape[-1]:]
    combo = mv(G.transpose(-1, -2), lh) + mv(A.transpose(-1, -2), nh)
    infeasible = ((combo.abs().amax(-1) <= small * (1 + torch.cat([G, A], -2).abs().amax((-1, -2))))
                  & ((h * lh).sum(-1) + (b * nh).sum(-1) < -small) & failed & ~unbounded)
    # a singular KKT matrix with a direction d in the null space of Q, A and G: the objective is flat along ±d
    # and unbounded below unless qᵀd = 0
    M = torch.cat([Qs, A, G], -2)
    _, sv, vh = torch.linalg.svd(M)
    d = vh[..., -1, :]
    flat = sv[..., -1] <= 1e-9 * sv[..., 0].clamp(min=1e-300)
    unbounded = unbounded | (failed & flat & ((q * d).sum(-1).abs() > small * (1 + q.abs().amax(-1))))
    count = lambda mask: f" ({int(mask.sum())} of {mask.numel()} problems)" if mask.dim() else ""  # noqa: E731
    if bool(infeasible.any()):
        raise InfeasibleError(f"qp: the constraints Gz <= h, Az = b have no solution{count(infeasible)}: "
                              f"check h and b (a Farkas certificate was found).")
    if bool(unbounded.any()):
        raise UnboundedError(f"qp: the objective is unbounded below on the feasible set{count(unbounded)}: Q is "
                             f"singular along a feasible direction; add constraints or make Q positive definite.")
    if bool(info.nonfinite.any()):
        _policy(on_nonfinite, NonFiniteError,
                f"qp: singular KKT system{count(info.nonfinite)}: A must have full row rank, and Q be positive "
                f"definite on the null space of A and G (else the solution is not unique).")
    rest = failed & ~info.nonfinite
    if bool(rest.any()):
        _policy(on_nonconvergence, NonConvergenceError,
                f"qp: the interior-point method did not converge in {int(info.steps.max())} steps: KKT residual "
                f"{float(info.residual[rest].max()) if rest.dim() else float(info.residual):.3g}{count(rest)}. "
                f"Raise steps=, loosen tol=, or rescale the problem.")


def _direction(v):
    """``v / ||v||`` per problem, scaled first by the largest entry so that huge iterates do not overflow."""
    v = v / v.abs().amax(-1, keepdim=True).clamp(min=1e-300)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-300)


def _entries(M):
    """The largest absolute entry of each problem's matrix (0 for an empty one)."""
    return M.abs().amax((-1, -2)) if M.numel() else M.new_zeros(M.shape[:-2])


def _rows(x):
    """The largest entry of each problem's vector (``-inf`` when it has no entries: no constraint to violate)."""
    return x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], float("-inf"))
