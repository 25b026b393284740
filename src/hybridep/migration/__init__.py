"""Parameter-efficient migration of experts: shared + residual (SR) compression."""
