//! `bind`: the listening socket, with the accept queue taskstream needs.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

/// A reconnect storm (thousands of browsers coming back after a restart) arrives faster than the
/// workers accept. std's `TcpListener::bind` listens with a backlog of 128, and actix's
/// `.backlog()` only applies to sockets actix binds itself, so the backlog is set here. The kernel
/// caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 8192;

/// Binds `address` (the first of its resolutions that binds) and listens with [`BACKLOG`].
pub fn bind(address: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for address in address.to_socket_addrs()? {
        match bind_one(address) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

fn bind_one(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // As std and actix do: a restart must not wait for the old connections' TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
