//! The enrich stage: for each failed bind, who or what is in the way and what to do.

pub mod diagnose;
pub mod history;
pub mod lookup;
pub mod netns;
pub mod owners;
pub mod sockdiag;
