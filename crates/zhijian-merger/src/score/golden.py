"""Expected values of the transferability scores' unit tests (`mod.rs`'s
`testing::F`, `Y`, `S`), computed with numpy by the formulas of each score's
reference code (TLlib `tllib/ranking`, google-research `stable_transfer`),
written out here independently of the Rust code.

Run: ~/.cache/zhijian/venv/bin/python crates/zhijian-merger/src/score/golden.py
"""

import numpy as np

F = np.array([
    [1.0, 0.2, -0.5], [0.8, -0.1, 0.3], [1.3, 0.4, 0.1], [-0.2, 1.1, 0.7],
    [0.1, 0.9, -0.3], [-0.4, 1.4, 0.2], [0.3, -0.6, 1.2], [-0.1, -0.2, 0.9],
])
Y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
S = np.array([
    [2.0, 0.1, -1.0, 0.3], [1.5, 0.2, 0.0, -0.4], [0.3, 1.1, -0.2, 0.0], [-0.5, 2.2, 0.4, 0.1],
    [0.0, 1.0, 1.2, -1.0], [0.2, 0.3, 2.0, 0.5], [-1.0, 0.0, 0.3, 1.8], [0.4, -0.3, 0.1, 1.1],
])
P = np.exp(S) / np.exp(S).sum(axis=1, keepdims=True)
C = Y.max() + 1


def logme(f, y):
    n, d = f.shape
    u, s, _ = np.linalg.svd(f.T @ f)
    out = []
    for c in range(y.max() + 1):
        t = (y == c).astype(float)
        proj = u.T @ (f.T @ t)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        for _ in range(11):
            gamma = np.sum(s / (s + lam))
            m = u @ (proj * beta / (alpha + beta * s))
            a_de = m @ m
            alpha = gamma / a_de
            b_de = np.sum((t - f @ m) ** 2)
            beta = (n - gamma) / b_de
            new = alpha / beta
            if abs(new - lam) / lam < 0.01:
                break
            lam = new
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
              - beta / 2 * b_de - alpha / 2 * a_de - n / 2 * np.log(2 * np.pi))
        out.append(ev / n)
    return np.mean(out)


def leep(p, y):
    n = len(y)
    joint = np.stack([p[y == c].sum(axis=0) / n for c in range(y.max() + 1)])
    cond = joint / joint.sum(axis=0, keepdims=True)
    eep = p @ cond.T
    return np.mean(np.log(eep[np.arange(n), y]))


def nce(z, y):
    n = len(y)
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0 / n)
    pz = joint.sum(axis=0)
    h = 0.0
    for j in range(joint.shape[1]):
        if pz[j] > 0:
            q = joint[:, j] / pz[j]
            q = q[q > 0]
            h -= pz[j] * np.sum(q * np.log(q))
    return -h


def hscore(f, y):
    g = np.stack([f[y == c].mean(axis=0) for c in y])
    return np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @ np.cov(g, rowvar=False))


def transrate(f, y, eps=1e-4):
    def rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]
    f = f - f.mean(axis=0, keepdims=True)
    return rate(f) - np.mean([rate(f[y == c]) for c in range(y.max() + 1)])


def gbc(f, y, dims=64):
    f = f - f.mean(axis=0)
    k = min(dims, *f.shape)
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    r = f @ vt[:k].T
    stats = [(r[y == c].mean(axis=0), np.maximum(r[y == c].var(axis=0), 1e-4)) for c in range(y.max() + 1)]
    total = 0.0
    for i, (m1, s1) in enumerate(stats):
        for j, (m2, s2) in enumerate(stats):
            if i != j:
                s = (s1 + s2) / 2
                db = np.sum((m1 - m2) ** 2 / s) / 8 + 0.5 * (np.sum(np.log(s)) - 0.5 * np.sum(np.log(s1)) - 0.5 * np.sum(np.log(s2)))
                total += np.exp(-db)
    return -total


for name, value in [
    ("logme", logme(F, Y)), ("leep", leep(P, Y)), ("nce", nce(P.argmax(axis=1), Y)),
    ("hscore", hscore(F, Y)), ("gbc", gbc(F, Y)), ("transrate", transrate(F, Y)),
]:
    print(f"{name}: {float(value)!r}")
