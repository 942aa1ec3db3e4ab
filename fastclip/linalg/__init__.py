"""The linear-algebra engine: a layer as a linear operator (forward and adjoint by
autograd), the Krylov iterations on it (block Lanczos, PowerQR, power iteration), their
lockstep form over many operators at once, the warm starts, the closed forms (FFT of a
circular convolution, batch norm), and the counters of what a step dispatches."""
