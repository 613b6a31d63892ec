//! A redirected plain HTTP connection: each request decided on `Host`, the original port
//! and the path, and forwarded by the same code as absolute-form requests.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::destination;
use crate::metrics::ListenerKind;
use crate::proxy::addr::ClientAddr;
use crate::proxy::plumbing::Slot;
use crate::proxy::serve::serve_connection;
use crate::proxy::state::Shared;

/// A redirected plain HTTP connection: requests decided on `Host`, the original port and
/// the path, forwarded like absolute-form requests.
pub(crate) async fn serve(
    stream: TcpStream,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
) {
    let live = shared.live();
    let Some((orig, _)) = destination(&stream, client, &live, ListenerKind::TransparentHttp) else {
        return;
    };
    drop(live);
    let handle = move |req, client, shared: Arc<Shared>| {
        crate::proxy::forward::http::forward_transparent(req, client, shared.live(), orig)
    };
    serve_connection(stream, client, shared, permit, handle).await;
}
