// z for the page: seeded draws from N(0, I) and paths between two points. Python reproduces
// priorSample with vaepipe.site.prior_sample (the tests compare the two).

// mulberry32 (Tommy Ettinger's 32-bit generator): tiny, seedable and easy to mirror in Python,
// where Math.random can be neither seeded nor reproduced.
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t = (t + Math.imul(t ^ (t >>> 7), t | 61)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// [n * dim] row-major N(0, temperature^2) draws: Box-Muller on pairs of mulberry32 uniforms.
export function priorSample(seed, n, dim, temperature) {
  const next = mulberry32(seed);
  const z = new Float32Array(n * dim);
  for (let i = 0; i < z.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - next())); // 1 - u is in (0, 1]: no log(0)
    const angle = 2 * Math.PI * next();
    z[i] = temperature * (r * Math.cos(angle));
    if (i + 1 < z.length) z[i + 1] = temperature * (r * Math.sin(angle));
  }
  return z;
}

// Spherical interpolation from a to b (straight line when they are almost parallel), as
// `vaepipe interpolate` does by default.
export function slerp(a, b, steps) {
  const dot = a.reduce((s, v, i) => s + v * b[i], 0);
  const norm = Math.hypot(...a) * Math.hypot(...b);
  const omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.max(norm, 1e-12))));
  const out = new Float32Array(steps * a.length);
  for (let s = 0; s < steps; s++) {
    const t = s / (steps - 1);
    const [wa, wb] =
      omega > 1e-4
        ? [Math.sin((1 - t) * omega) / Math.sin(omega), Math.sin(t * omega) / Math.sin(omega)]
        : [1 - t, t];
    for (let d = 0; d < a.length; d++) out[s * a.length + d] = wa * a[d] + wb * b[d];
  }
  return out;
}
