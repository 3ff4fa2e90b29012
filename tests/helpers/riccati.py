"""Independent exact value gradient for a Gaussian base and a quadratic reward (test helper).

v_base = A_t x + b_t (single Gaussian), r = −½(x − m)ᵀQ(x − m). The value function of the relaxed
problem is V = ½xᵀP x + qᵀx + c with (value consistency ∂_t V = (β/2)|∇V|² − ∇V·v_base)
    Ṗ = βP² − (PA + AP),   q̇ = βPq − Aq − Pb,   P(1) = Q, q(1) = −Qm,
so g = ∇V = P(t)x + q(t). Integrated backward from t = 1 by RK4 in float64, every requested t at once (each with
its own n steps of (1 − t)/n: the same arithmetic as one t at a time, batched).
"""
import torch


def base_field(mu: torch.Tensor, cov: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t, b_t) of v_base = A_t x + b_t; t a float, or a tensor [K] for a batch ([K, d, d], [K, d])."""
    d = mu.shape[0]
    s = torch.as_tensor(t, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    C = s[..., None, None] ** 2 * cov + (1 - s[..., None, None]) ** 2 * eye
    A = (s[..., None, None] * cov - (1 - s[..., None, None]) * eye) @ torch.linalg.inv(C)
    return A, mu - s[..., None] * (A @ mu)


def value_gradient_coeffs(mu, cov, Q, m, beta, t, n=300):
    """(P(t), q(t)) by RK4 from t = 1 down to t (n steps: global error ~1e-11, smooth in t, so FDs in t stay exact);
    t a float, or a tensor [K] for a batch ([K, d, d], [K, d])."""
    s = torch.as_tensor(t, dtype=torch.float64).clone()
    P = Q.expand(*s.shape, *Q.shape).clone()
    q = (-Q @ m).expand(*s.shape, m.shape[0]).clone()
    h = (1.0 - s) / n
    hm, hv = h[..., None, None], h[..., None]

    def rhs(s, P, q):
        A, b = base_field(mu, cov, s)
        return beta * P @ P - (P @ A + A @ P), beta * (P @ q[..., None])[..., 0] - (A @ q[..., None])[..., 0] - (
            P @ b[..., None])[..., 0]

    s = torch.ones_like(s)
    for _ in range(n):
        k1 = rhs(s, P, q)
        k2 = rhs(s - h / 2, P - hm / 2 * k1[0], q - hv / 2 * k1[1])
        k3 = rhs(s - h / 2, P - hm / 2 * k2[0], q - hv / 2 * k2[1])
        k4 = rhs(s - h, P - hm * k3[0], q - hv * k3[1])
        P = P - hm / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        q = q - hv / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        s = s - h
    return P, q


def exact_g(mu, cov, Q, m, beta):
    """g(x, t) for x [B, d], t [B] (t may vary per row)."""
    cache = {}

    def g(x, t):
        keys = [round(ti, 12) for ti in t.tolist()]
        new = sorted(set(keys) - cache.keys())
        if new:
            P, q = value_gradient_coeffs(mu, cov, Q, m, beta, torch.tensor(new, dtype=torch.float64))
            cache.update({k: (P[i], q[i]) for i, k in enumerate(new)})
        return torch.stack([cache[k][0].to(x) @ xi + cache[k][1].to(x) for xi, k in zip(x, keys)])

    return g
