"""Data terms of the LDDMM energy, with closed-form gradients (no autograd through them).

Both terms see the source only through the deformed source image sampled at their observation points,
and return the energy and its gradient with respect to those samples; the optimiser back-propagates that
gradient through the interpolation and the flow (:mod:`._lddmm`). Writing the gradients out keeps one
evaluation at a handful of passes over the target pixels (see ``benchmarks/profile_lddmm.py``).

* :class:`MixtureTerm`: every target pixel ``J(y)`` (e.g. RGB H&E) is explained by a three-class Gaussian
  mixture: matched tissue with mean ``f_theta(I'(y))`` (a polynomial contrast map of every source channel,
  refitted by weighted least squares at each evaluation), background with a constant colour ``mu_B`` and
  artifact (tissue with no source counterpart) with a constant colour ``mu_A``.
* :class:`SpotTerm`: sparse target observations (Visium spot expression of genes shared with the source),
  each compared with a smoothed source feature field sampled at the spot's pulled-back position through a
  per-feature affine calibration (refitted at each evaluation). Spots are weighted by an EM posterior of
  being matched (so spots with no source tissue under them drop out), and each feature's noise level is
  estimated by maximum likelihood, so the term's weight against the image term is estimated, not set.
"""

from __future__ import annotations

import math

import torch

CLASSES = ("match", "background", "artifact")


def _weighted_gram(m: torch.Tensor, mw: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """``mw @ m.T`` in float64 (``m``, ``mw``: ``(R, N)``), summed in chunks of 2^16 pixels.

    Each chunk's product is a float32 (or the input's dtype) matrix product, the partial sums are accumulated in
    float64: a float32 sum over ~1e5-1e6 pixels makes the contrast fit (hence the energy) jitter by more than the
    line search's predicted decrease near convergence. The chunks are views of the inputs (no padded copy). The
    last, partial chunk (all of it below 2^16 pixels) is a float64 product, its operands converted into ``work``
    (``(2, R, N mod 2^16)`` float64) when given: a fresh float64 copy of a level's pixels at every evaluation cost
    more than the product (16 rows of 40000 pixels, a 200 x 200 level with four source channels: the mixture
    term's energy and gradient 9.2 -> 3.5 ms, ``python benchmarks/profile_lddmm.py --data-term``).
    """
    r, n = m.shape
    chunk = 1 << 16
    n_full = (n // chunk) * chunk
    out = torch.zeros(r, r, dtype=torch.float64, device=m.device)
    if n_full:
        a = mw[:, :n_full].reshape(r, -1, chunk).transpose(0, 1)
        b = m[:, :n_full].reshape(r, -1, chunk).transpose(0, 1)
        out += torch.bmm(a, b.transpose(1, 2)).sum(0, dtype=torch.float64)
    if n_full < n:
        if work is not None and work.shape == (2, r, n - n_full):
            work[0].copy_(mw[:, n_full:])
            work[1].copy_(m[:, n_full:])
            out += work[0] @ work[1].T
        else:
            out += mw[:, n_full:].double() @ m[:, n_full:].double().T
    return out


def _solve_gram(full: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``argmin_theta sum_n w_n |y_n - theta^T phi_n|^2`` from the Gram matrix of ``[phi; y]``.

    Returns ``theta`` (``(F, C)``, float64) and the ridge-regularised ``phi W phi^T``.
    """
    gram, rhs = full[:f, :f], full[:f, f:]
    ridge = 1e-6 * torch.trace(gram) / f + 1e-12
    gram = gram + ridge * torch.eye(f, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, rhs), gram


class MixtureTerm:
    """Gaussian-mixture matching of a deformed source image against target pixels.

    Each target pixel is explained by one of three classes: *match* (tissue with a source counterpart; mean
    ``f_theta(I'(y))``), *background* (slide; constant colour) and *artifact* (tissue without a source
    counterpart: outside the source's field of view, a fold, debris; constant colour, the tissue's spread).
    The class priors depend on whether the deformed source has tissue at the pixel: with ``o(y) = tanh(I'_0(y) /
    tau)`` the occupancy of the first source channel (the cell density), ``pi(y) = o pi_in + (1 - o) pi_out``.
    Where the source has tissue the target should be matched tissue (``pi_in``, mostly match); elsewhere it is
    background or tissue the source lacks (``pi_out``). So target tissue beyond the source's field of view costs
    little (no pull to stretch the source over it), while source tissue over the target's background costs a lot.

    Parameters
    ----------
    J
        ``(C_J, N)`` target values at the observation pixels (channel-first).
    sigma
        Standard deviations of the (match, background, artifact) classes, target intensity units; the artifact's
        may be ``None`` (then the spread of the target's tissue colours).
    degree
        Degree of the per-channel polynomial contrast map.
    active
        Which of (match, background, artifact) are modelled.
    prior_in, prior_out
        Class priors where the deformed source has tissue and where it has none (renormalised over the active
        classes).
    tissue_level
        ``tau``: source value (first channel) above which a pixel counts as tissue.
    area
        Weight of one pixel (its area in units of the finest source pixel), so the energy is an integral.
    fov
        Whether the last row of the deformed source is its field of view ``v(y)`` in ``[0, 1]`` (1 where the source
        was observed, e.g. inside the Xenium region; 0 beyond a cut through the tissue and off the source image).
        A pixel's energy is then ``v e(y) + (1 - v) c(y)``: outside the field of view it is what an observed pixel
        of the same target colour costs on average (``c``: least squares of the observed pixels' energies on
        ``[1, J, J^2]`` per channel, weighted by ``v``; refitted at each M-step, a constant between them).
        Covering target tissue with source tissue that matches it only as well as elsewhere then earns nothing, so
        the source's cut is not stretched over the tissue beyond it.
    """

    def __init__(
        self,
        J,
        sigma,
        degree,
        active,
        prior_in=(0.9, 0.05, 0.05),
        prior_out=(0.05, 0.5, 0.45),
        tissue_level=0.1,
        area=1.0,
        fov=False,
    ):
        self.J = J
        self.fov = bool(fov)
        self._fill = None  # (N,) energy of a pixel outside the source's field of view (fov=True)
        self._fov_post = None  # (field of view, per-pixel energy) at the last call with want_post
        self.C = J.shape[0]
        self.sigma = list(sigma)
        self.degree = int(degree)
        self.active = tuple(bool(a) for a in active)
        self.idx = [k for k in range(3) if self.active[k]]
        self.area = float(area)
        self.tau = float(tissue_level)
        act = torch.tensor(self.active, dtype=torch.float64)
        self.pi_in = torch.tensor(prior_in, dtype=torch.float64) * act
        self.pi_out = torch.tensor(prior_out, dtype=torch.float64) * act
        self.pi_in, self.pi_out = self.pi_in / self.pi_in.sum(), self.pi_out / self.pi_out.sum()
        self.mu_b = self.mu_a = None
        self.w_fit = torch.ones(J.shape[1], dtype=J.dtype, device=J.device)
        self.theta = None
        self._ell = None  # log-densities of the constant classes, (2, N)
        self._state = None  # what gradient() needs from the last energy() call
        self._phi_j = self._z = None  # work buffers: [phi; J] and [dE/dmu; w phi; w J], (., N)
        self._work = None  # float64 operands of the Gram matrix's last partial chunk (see _weighted_gram)

    # ------------------------------------------------------------------ nuisance parameters
    def init_colours(self, J_img_border: torch.Tensor):
        """Background colour from the border pixels; artifact colour and spread from the clearly non-background ones."""
        J = self.J
        if self.mu_b is None:
            self.mu_b = J_img_border.median(dim=1).values
        if self.mu_a is None or self.sigma[2] is None:
            dist = ((J - self.mu_b[:, None]) ** 2).sum(0)
            tissue = dist > (3 * self.sigma[0]) ** 2
            if int(tissue.sum()) < 10:
                tissue = dist >= torch.quantile(dist.float(), 0.9).to(dist.dtype)
            Jt = J[:, tissue]
            if self.mu_a is None:
                self.mu_a = Jt.median(dim=1).values
            if self.sigma[2] is None:
                spread = float(Jt.double().var(dim=1).mean().sqrt())
                self.sigma[2] = max(spread, float(self.sigma[0]))
        self._update_fixed()

    def _update_fixed(self):
        rows = []
        for k, mu in ((1, self.mu_b), (2, self.mu_a)):
            d = self.J - mu[:, None]
            rows.append(-self.C * math.log(self.sigma[k]) - (d * d).sum(0) * (0.5 / self.sigma[k] ** 2))
        self._ell = torch.stack(rows)

    def m_step(self, post: torch.Tensor, occupancy: torch.Tensor, update_priors: bool):
        """Update the constant classes' colours (and the priors) from ``post`` = ``(3, N)`` posteriors."""
        J = self.J
        v = None
        if self.fov:
            if self._fov_post is None:
                raise RuntimeError("MixtureTerm.m_step() with fov needs a preceding energy(want_post=True) call")
            v, e_pix = self._fov_post
        self.w_fit = post[0].clone() if v is None else post[0] * v
        for k, name in ((1, "mu_b"), (2, "mu_a")):
            if self.active[k]:
                wk = post[k]
                tot = float(wk.sum())
                if tot > 1e-6:
                    setattr(self, name, (J * wk).sum(1) / tot)
        if v is not None:
            # the fill of unobserved pixels: the energy an observed pixel of the same target colour has, on average
            # (least squares of the observed pixels' energies on [1, J, J^2] per channel, weighted by v)
            xf = torch.cat([torch.ones_like(J[:1]), J, J * J, e_pix[None].to(J.dtype)])
            beta, _ = _solve_gram(_weighted_gram(xf, xf * v.to(J.dtype)), xf.shape[0] - 1)
            self._fill = (beta.to(J.dtype).T @ xf[:-1])[0]
        if update_priors:
            o = occupancy.double()
            pd = post.double()
            vd = 1.0 if v is None else v.double()  # observed pixels only
            for name, wt in (("pi_in", o * vd), ("pi_out", (1.0 - o) * vd)):
                tot = float(wt.sum())
                if tot > 1e-6:
                    pi = ((pd * wt).sum(1) / tot).clamp_min(1e-3) * torch.tensor(self.active, dtype=torch.float64)
                    setattr(self, name, pi / pi.sum())
        self._update_fixed()

    # ------------------------------------------------------------------ energy
    def features(self, Iw: torch.Tensor) -> torch.Tensor:
        """``[1, I, I^2, ..., I^degree]`` stacked over source channels: ``(1 + C_I * degree, N)``.

        Written into the rows of a buffer held by the term (``[phi; J]``, the operand of the contrast fit's Gram
        matrix), so the returned view is overwritten by the next call.
        """
        c_i, n = Iw.shape
        f = 1 + c_i * self.degree
        if self._phi_j is None or self._phi_j.shape != (f + self.C, n) or self._phi_j.dtype != Iw.dtype:
            self._phi_j = torch.empty(f + self.C, n, dtype=Iw.dtype, device=Iw.device)
            self._phi_j[f:] = self.J
            self._z = torch.empty(2 * self.C + f, n, dtype=Iw.dtype, device=Iw.device)
            self._work = torch.empty(2, f + self.C, n % (1 << 16), dtype=torch.float64, device=Iw.device)
        buf = self._phi_j
        buf[0] = 1.0
        buf[1 : 1 + c_i] = Iw
        for d in range(2, self.degree + 1):
            torch.mul(buf[1 + (d - 2) * c_i : 1 + (d - 1) * c_i], Iw, out=buf[1 + (d - 1) * c_i : 1 + d * c_i])
        return buf[:f]

    def occupancy(self, Iw: torch.Tensor) -> torch.Tensor:
        """``o(y) = tanh(I'_0(y) / tau)``: whether the deformed source has tissue at each pixel."""
        return torch.tanh(Iw[0].clamp_min(0.0) / self.tau)

    def evaluate(self, Iw: torch.Tensor, *, want_grad: bool = True, want_post: bool = False):
        """Energy (float64 scalar), gradient ``dE/dIw`` (``(C_I, N)``) and optionally the posteriors ``(3, N)``.

        The contrast ``theta(Iw)`` is the weighted least-squares fit with the weights of the last M-step, so the
        energy is a smooth function of ``Iw`` and its gradient includes the change of the fit (implicit
        differentiation of the normal equations): the optimiser's line search sees exact derivatives.

        The term is memory-bound, so pixel-sized arrays are written once into buffers the term keeps: ``[phi; J]``
        (whose weighted copy ``w [phi; J]`` gives the Gram matrix) and ``[dE/dmu; w phi; w J]``, so the direct and
        implicit gradient parts are one matrix product. One evaluation (energy and gradient, 1e6 pixels, two
        cores, best of 8) went from 83 to 43 ms with one source channel and from 287 to 88 ms with four (the
        default cell-type source); ``benchmarks/profile_lddmm.py --data-term --channels 4``.

        ``evaluate(Iw, want_grad=True)`` is :meth:`energy` followed by :meth:`gradient`; the optimiser calls the two
        apart, so a line-search trial that is rejected never pays for its gradient.
        """
        energy, post = self.energy(Iw, want_post=want_post)
        return energy, self.gradient() if want_grad else None, post

    def energy(self, Iw: torch.Tensor, *, want_post: bool = False):
        """Energy (float64 scalar) and optionally the posteriors ``(3, N)``; :meth:`gradient` may follow.

        The intermediates the gradient needs are kept until the next call (which also overwrites the buffers).
        """
        self._state = None  # the last call's intermediates go before this call's are made
        J = self.J
        n = J.shape[1]
        c_j = self.C
        v, Iw_in = None, Iw
        if self.fov:
            Iw, v = Iw[:-1], Iw[-1].clamp(0.0, 1.0)
        phi = self.features(Iw)
        f = phi.shape[0]
        z = self._z
        torch.mul(self._phi_j, self.w_fit, out=z[c_j:])  # w [phi; J]
        theta64, gram = _solve_gram(_weighted_gram(self._phi_j, z[c_j:], self._work), f)
        theta = theta64.to(phi.dtype)
        self.theta = theta
        diff = J - theta.T @ phi  # J - mu, (C_J, N)
        s_m = self.sigma[0]
        o = self.occupancy(Iw)
        logs = torch.empty(len(self.idx), n, dtype=J.dtype, device=J.device)
        pi_in, pi_out = self.pi_in.tolist(), self.pi_out.tolist()
        pis = []
        for j, k in enumerate(self.idx):
            pi_k = (o * (pi_in[k] - pi_out[k])).add_(pi_out[k]).clamp_min_(1e-12)
            pis.append(pi_k)
            torch.log(pi_k, out=logs[j])
            if k == 0:
                sq = (diff * diff).sum(0)
                logs[j].add_(sq, alpha=-0.5 / s_m**2).sub_(self.C * math.log(s_m))
            else:
                logs[j].add_(self._ell[k - 1])
        lse = torch.logsumexp(logs, 0)
        fill = None
        if v is None:
            energy = -lse.sum(dtype=torch.float64) * self.area
        else:
            fill = self._fill if self._fill is not None else torch.zeros_like(lse)
            energy = (fill - v * (lse + fill)).sum(dtype=torch.float64) * self.area
            if want_post:
                self._fov_post = (v.clone(), -lse)
        post_a = torch.softmax(logs, 0)  # posteriors of the active classes
        self._state = (Iw_in, Iw, phi, theta64, gram, diff, o, post_a, pis, pi_in, pi_out, v, lse, fill)
        post = None
        if want_post:
            post = torch.zeros(3, J.shape[1], dtype=J.dtype, device=J.device)
            post[self.idx] = post_a
        return energy, post

    def gradient(self, Iw: torch.Tensor | None = None) -> torch.Tensor:
        """``dE/dIw`` (``(C_I, N)``) at the last :meth:`energy` call's ``Iw``.

        With ``Iw``, that call must have been on this very tensor (else the term was evaluated elsewhere since).
        """
        if self._state is None or (Iw is not None and self._state[0] is not Iw):
            raise RuntimeError("MixtureTerm.gradient() needs a preceding energy() call on the same input")
        _, Iw, phi, theta64, gram, diff, o, post_a, pis, pi_in, pi_out, v, lse, fill = self._state
        self._state = None
        z = self._z
        c_j = self.C
        s_m = self.sigma[0]
        grad = None
        w_pix = post_a[0] if v is None else post_a[0] * v  # an unobserved pixel's energy does not depend on it
        g_mu = torch.mul(diff, w_pix * (-self.area / s_m**2), out=z[:c_j])  # dE/dmu, (C_J, N)
        # through theta: dE/dtheta = phi g_mu^T; with Lam = G^-1 dE/dtheta, the normal equations give
        # dE/dphi += w * (Lam (J - mu) - theta Lam^T phi) = Lam (w J) - (Lam theta^T + theta Lam^T)(w phi).
        # Direct and implicit parts in one product with z = [g_mu; w phi; w J] (the constant feature's row,
        # which has no derivative, dropped)
        lam = torch.linalg.solve(gram, (phi @ g_mu.T).double())  # (F, C_J)
        sym = lam @ theta64.T
        m = torch.cat([theta64, -(sym + sym.T), lam], 1)[1:].to(phi.dtype)  # (F - 1, 2 C_J + F)
        g_phi = m @ z  # (F - 1, N): rows of [I, I^2, ..., I^degree] per source channel
        c_i = Iw.shape[0]
        # dphi_(i,d)/dIw_i = d * Iw_i^(d-1): Horner over the degree
        for d in range(self.degree, 0, -1):
            term = g_phi[(d - 1) * c_i : d * c_i]
            term = term * d if d > 1 else term
            grad = term if grad is None else term.addcmul_(Iw, grad)
        # through the priors: d(-lse)/do = -sum_k p_k (pi_in_k - pi_out_k) / pi_k(o)
        g_o = None
        for j, k in enumerate(self.idx):
            dk = pi_in[k] - pi_out[k]
            if dk != 0.0:
                t = post_a[j] / pis[j]
                g_o = t.mul_(-dk) if g_o is None else g_o.sub_(t, alpha=dk)
        if g_o is not None:
            # do/dIw_0 = (1 - o^2) / tau where Iw_0 > 0 (the clamp), per unit pixel area
            g_o.mul_((1.0 - o * o).mul_((Iw[0] > 0) * (self.area / self.tau)))
            if v is not None:
                g_o.mul_(v)
            grad[0] += g_o
        if v is not None:
            # d/dv of v e + (1 - v) c = e - c (the clamp's derivative ignored: bilinear samples of a [0, 1] mask)
            grad = torch.cat([grad, ((-lse - fill) * self.area)[None]])
        return grad


class SpotTerm:
    """Calibrated matching of sparse target observations against a smoothed source feature field.

    Parameters
    ----------
    values
        ``(G, S)`` target features at ``S`` spots (e.g. normalised log expression of shared genes).
    area
        Weight of one spot (the tissue area it stands for, in units of the finest source pixel).
    sigma_floor
        Smallest noise level per feature (relative to its standard deviation over spots).
    """

    def __init__(self, values: torch.Tensor, area: float, sigma_floor: float = 0.05):
        self.E = values
        self.G, self.S = values.shape
        self.area = float(area)
        sd = values.std(dim=1).clamp_min(1e-6)
        self.floor = sigma_floor * sd
        self.sigma = sd.clone()  # start at the spread of each feature: a weak term until matched
        self.w = torch.ones(self.S, dtype=values.dtype, device=values.device)  # matched-spot posterior
        self.calib = None

    def evaluate(self, F: torch.Tensor, *, want_grad: bool = True):
        """Energy and gradient w.r.t. the source features sampled at the spots ``F`` (``(G, S)``)."""
        w = self.w
        sw = w.sum().clamp_min(1e-9)
        # per-feature affine calibration E_g ≈ b_g F_g + c_g, weighted least squares (closed form)
        fm = (F * w).sum(1, keepdim=True) / sw
        em = (self.E * w).sum(1, keepdim=True) / sw
        fc, ec = F - fm, self.E - em
        var = (fc * fc * w).sum(1, keepdim=True) / sw + 1e-9
        b = ((fc * ec * w).sum(1, keepdim=True) / sw / var).clamp_min(0.0)  # expression agrees in sign
        self.calib = (b.squeeze(1), (em - b * fm).squeeze(1))
        r = ec - b * fc  # (G, S)
        inv = 1.0 / (self.sigma[:, None] ** 2)
        energy = (0.5 * (r * r) * inv * w).sum(dtype=torch.float64) * self.area
        grad = None
        if want_grad:
            grad = -(r * inv * w) * b * self.area
        return energy, grad, r

    def m_step(self, r: torch.Tensor, occupancy: torch.Tensor):
        """Update noise levels from the residuals and the spot weights from the source occupancy there."""
        self.w = occupancy.clamp(0.0, 1.0)
        sw = self.w.sum().clamp_min(1e-9)
        s2 = (r * r * self.w).sum(1) / sw
        self.sigma = torch.maximum(s2.sqrt(), self.floor)
