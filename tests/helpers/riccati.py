"""Independent exact value gradient for a Gaussian base and a quadratic reward (test helper).

v_base = A_t x + b_t (single Gaussian), r = −½(x − m)ᵀQ(x − m). The value function of the relaxed
problem is V = ½xᵀP x + qᵀx + c with (value consistency ∂_t V = (β/2)|∇V|² − ∇V·v_base)
    Ṗ = βP² − (PA + AP),   q̇ = βPq − Aq − Pb,   P(1) = Q, q(1) = −Qm,
so g = ∇V = P(t)x + q(t). Integrated backward from t = 1 by RK4 in float64.
"""
import torch


def base_field(mu: torch.Tensor, cov: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = mu.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    C = t ** 2 * cov + (1 - t) ** 2 * eye
    A = (t * cov - (1 - t) * eye) @ torch.linalg.inv(C)
    return A, mu - t * A @ mu


def value_gradient_coeffs(mu, cov, Q, m, beta, t, n=300):
    """(P(t), q(t)) by RK4 from t = 1 down to t (n steps: global error ~1e-11, smooth in t, so FDs in t stay exact)."""
    P, q = Q.clone(), -Q @ m
    h = (1.0 - t) / n

    def rhs(s, P, q):
        A, b = base_field(mu, cov, s)
        return beta * P @ P - (P @ A + A @ P), beta * P @ q - A @ q - P @ b

    s = 1.0
    for _ in range(n):
        k1 = rhs(s, P, q)
        k2 = rhs(s - h / 2, P - h / 2 * k1[0], q - h / 2 * k1[1])
        k3 = rhs(s - h / 2, P - h / 2 * k2[0], q - h / 2 * k2[1])
        k4 = rhs(s - h, P - h * k3[0], q - h * k3[1])
        P = P - h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        q = q - h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        s -= h
    return P, q


def exact_g(mu, cov, Q, m, beta):
    """g(x, t) for x [B, d], t [B] (t may vary per row)."""
    cache = {}

    def g(x, t):
        out = []
        for xi, ti in zip(x, t.tolist()):
            key = round(ti, 12)
            if key not in cache:
                cache[key] = value_gradient_coeffs(mu, cov, Q, m, beta, ti)
            P, q = cache[key]
            out.append(P.to(x) @ xi + q.to(x))
        return torch.stack(out)

    return g
