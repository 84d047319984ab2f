//! Host-buildable library target: lets the agent's build script depend on this crate so cargo
//! rebuilds the eBPF object when it changes. The programs are in `main.rs`.

#![no_std]
