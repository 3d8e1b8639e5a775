//! What the load tool (`taskstream-bench`) and the fault run (`taskstream-faults`) share: a
//! minimal HTTP/1.1 client over raw sockets. The SSE parser is the `taskstream-sse` crate, which
//! the integration tests use too.

pub mod http;
