//! The SSH executor (russh, ring backend) with host-key verification through the instance secret.
