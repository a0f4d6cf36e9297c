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


def _solve_wls(phi: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``argmin_theta sum_n w_n |y_n - theta^T phi_n|^2`` (``phi (F, N)``, ``y (C, N)``).

    Returns ``theta`` (``(F, C)``) and the (ridge-regularised, float64) Gram matrix ``phi W phi^T``. The Gram
    matrix and right-hand side come from one product of the stacked ``[phi; y]``, summed in chunks of 2^16 pixels
    whose partial sums are accumulated in float64: a float32 sum over ~1e5-1e6 pixels makes theta (hence the
    energy) jitter by more than the line search's predicted decrease near convergence.
    """
    f = phi.shape[0]
    m = torch.cat([phi, y], 0)
    n = m.shape[1]
    chunk = 1 << 16
    if n > chunk:
        pad = (-n) % chunk
        mp = torch.nn.functional.pad(m, (0, pad)).reshape(m.shape[0], -1, chunk).transpose(0, 1)
        wp = torch.nn.functional.pad(w, (0, pad)).reshape(-1, 1, chunk)
        full = torch.bmm(mp * wp, mp.transpose(1, 2)).double().sum(0)
    else:
        m = m.double()
        full = (m * w.double()) @ m.T
    gram, rhs = full[:f, :f], full[:f, f:]
    ridge = 1e-6 * torch.trace(gram) / f + 1e-12
    gram = gram + ridge * torch.eye(f, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, rhs).to(phi.dtype), gram


class MixtureTerm:
    """Gaussian-mixture matching of a deformed source image against target pixels.

    Parameters
    ----------
    J
        ``(C_J, N)`` target values at the observation pixels (channel-first).
    sigma
        Standard deviations of the (match, background, artifact) classes, target intensity units.
    degree
        Degree of the per-channel polynomial contrast map.
    active
        Which of (match, background, artifact) are modelled.
    priors
        Initial class priors (renormalised over the active classes).
    area
        Weight of one pixel (its area in units of the finest source pixel), so the energy is an integral.
    """

    def __init__(self, J, sigma, degree, active, priors=(0.6, 0.3, 0.1), area=1.0):
        self.J = J
        self.C = J.shape[0]
        self.sigma = tuple(float(s) for s in sigma)
        self.degree = int(degree)
        self.active = tuple(bool(a) for a in active)
        self.area = float(area)
        pi = torch.tensor(priors, dtype=torch.float64) * torch.tensor(self.active, dtype=torch.float64)
        self.log_pi = torch.log(pi / pi.sum()).clamp_min(-1e4)
        self.mu_b = self.mu_a = None
        self.w_fit = torch.ones(J.shape[1], dtype=J.dtype, device=J.device)
        self.theta = None
        self.sigma0 = None
        self._fixed = None  # log-densities of the constant classes, (2, N)

    # ------------------------------------------------------------------ nuisance parameters
    def init_colours(self, J_img_border: torch.Tensor):
        """Background colour from the border pixels, artifact colour from the clearly non-background ones."""
        J = self.J
        if self.mu_b is None:
            self.mu_b = J_img_border.median(dim=1).values
        if self.mu_a is None:
            # the artifact class starts at the typical tissue colour (median of the pixels clearly off the
            # background), so target tissue with no source counterpart is explained by it
            dist = ((J - self.mu_b[:, None]) ** 2).sum(0)
            tissue = dist > (3 * self.sigma[0]) ** 2
            if int(tissue.sum()) < 10:
                tissue = dist >= torch.quantile(dist.float(), 0.9).to(dist.dtype)
            self.mu_a = J[:, tissue].median(dim=1).values
        self._update_fixed()

    def _log_norm(self, k: int) -> float:
        s = self.sigma[k]
        return float(self.log_pi[k]) - self.C * math.log(s)

    def _update_fixed(self):
        rows = []
        for k, mu in ((1, self.mu_b), (2, self.mu_a)):
            if self.active[k]:
                d = self.J - mu[:, None]
                rows.append(self._log_norm(k) - (d * d).sum(0) * (0.5 / self.sigma[k] ** 2))
        self._fixed = torch.stack(rows) if rows else None
        # log-sum of the constant classes: the match class is then combined with it in one logaddexp
        self._fixed_lse = None if self._fixed is None else torch.logsumexp(self._fixed, 0)

    def m_step(self, post: torch.Tensor, update_priors: bool, update_sigma: bool = False, mu_m=None):
        """Update class colours (priors, noise levels) from ``post`` = ``(3, N)`` posteriors.

        With ``update_sigma`` the matched and background classes' standard deviations are re-estimated by
        maximum likelihood (``mu_m``: the matched class's current mean, ``(C_J, N)``), floored at a twentieth of
        their initial values; the artifact class keeps its broad initial spread.
        """
        J = self.J
        self.w_fit = post[0].clone()
        sig = list(self.sigma)
        for k, name in ((1, "mu_b"), (2, "mu_a")):
            if self.active[k]:
                wk = post[k]
                tot = float(wk.sum())
                if tot > 1e-6:
                    setattr(self, name, (J * wk).sum(1) / tot)
        if update_sigma:
            if self.sigma0 is None:
                self.sigma0 = tuple(self.sigma)
            for k, mu in ((0, mu_m), (1, None if self.mu_b is None else self.mu_b[:, None])):
                wk = post[k].double()
                if mu is None or not self.active[k] or float(wk.sum()) < 10:
                    continue
                r2 = ((J - mu) ** 2).sum(0).double()
                s2 = float((wk * r2).sum() / (self.C * wk.sum()))
                sig[k] = max(math.sqrt(s2), self.sigma0[k] / 20)
            self.sigma = tuple(sig)
        if update_priors:
            pi = post.double().mean(1).clamp_min(1e-3) * torch.tensor(self.active, dtype=torch.float64)
            self.log_pi = torch.log(pi / pi.sum()).clamp_min(-1e4)
        self._update_fixed()

    # ------------------------------------------------------------------ energy
    def features(self, Iw: torch.Tensor) -> torch.Tensor:
        """``[1, I, I^2, ..., I^degree]`` stacked over source channels: ``(1 + C_I * degree, N)``."""
        rows = [torch.ones_like(Iw[:1])]
        p = Iw
        for d in range(1, self.degree + 1):
            if d > 1:
                p = p * Iw
            rows.append(p)
        return torch.cat(rows, 0)

    def evaluate(self, Iw: torch.Tensor, *, want_grad: bool = True, want_post: bool = False):
        """Energy (float64 scalar), gradient ``dE/dIw`` (``(C_I, N)``) and optionally the posteriors ``(3, N)``.

        The contrast ``theta(Iw)`` is the weighted least-squares fit with the weights of the last M-step, so the
        energy is a smooth function of ``Iw`` and its gradient includes the change of the fit (implicit
        differentiation of the normal equations): the optimiser's line search sees exact derivatives.
        """
        J = self.J
        phi = self.features(Iw)
        theta, gram = _solve_wls(phi, self.w_fit, J)
        self.theta = theta
        mu = theta.T @ phi
        self.mu_m = mu
        diff = J - mu  # (C_J, N)
        s_m = self.sigma[0]
        lm = self._log_norm(0) - (diff * diff).sum(0) * (0.5 / s_m**2)
        if self._fixed_lse is None:
            lse = lm
            p_m = torch.ones_like(lm)
        else:
            lse = torch.logaddexp(lm, self._fixed_lse)
            p_m = torch.sigmoid(lm - self._fixed_lse)
        energy = -lse.sum(dtype=torch.float64) * self.area
        grad = post = None
        if want_grad:
            g_mu = diff * (p_m * (-self.area / s_m**2))  # dE/dmu, (C_J, N)
            # through theta: dE/dtheta = phi g_mu^T; with Lam = G^-1 dE/dtheta, the normal equations give
            # dE/dphi += w * (Lam (J - mu) - theta Lam^T phi)
            lam = torch.linalg.solve(gram, (phi @ g_mu.T).double()).to(phi.dtype)  # (F, C_J)
            g_phi = theta @ g_mu + (lam @ diff - (theta @ lam.T) @ phi) * self.w_fit  # (F, N), direct + implicit
            c_i = Iw.shape[0]
            # dphi_(i,d)/dIw_i = d * Iw_i^(d-1): Horner over the degree
            for d in range(self.degree, 0, -1):
                term = d * g_phi[1 + (d - 1) * c_i : 1 + d * c_i]
                grad = term if grad is None else term + Iw * grad
        if want_post:
            post = torch.zeros(3, J.shape[1], dtype=J.dtype, device=J.device)
            post[0] = p_m
            if self._fixed is not None:
                idx = [k for k in (1, 2) if self.active[k]]
                post[idx] = torch.exp(self._fixed - lse)
        return energy, grad, post


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
