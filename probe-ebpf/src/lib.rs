//! The probe's programs live in `main.rs` and only build for the BPF target. This empty
//! library exists so that the tracer can name the probe as a build-dependency and be rebuilt
//! whenever the probe or `common` changes.
#![no_std]
