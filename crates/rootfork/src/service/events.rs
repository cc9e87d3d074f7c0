//! `rootfork.v1.Events`: the event feed as a stream, optionally about one sandbox; a watcher too
//! slow to keep up gets an ERROR event saying how many it missed.

use std::pin::Pin;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Api;
use crate::api::v1::{self, events_server};
use crate::events::{EventBus, EventKind};

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl events_server::Events for Api {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let filter = req.into_inner().sandbox;
        if !filter.is_empty() {
            crate::names::sandbox_id(&filter)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let mut rx = self.core.events.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = match rx.recv().await {
                    Ok(ev) if !filter.is_empty() && ev.sandbox != filter => continue,
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => {
                        let mut b = EventBus::event(EventKind::Error)
                            .message(format!("this watcher fell behind and missed {n} events"));
                        if !filter.is_empty() {
                            b = b.sandbox(&filter);
                        }
                        b.build()
                    }
                    Err(RecvError::Closed) => return,
                };
                if tx.send(Ok(v1::Event::from(item))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
