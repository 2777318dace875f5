//! The client side of transactional messages: EndTransaction, and the
//! check-back loop that asks live producers about half messages left
//! unresolved (`RecoverOrphanedTransactionCommand` on their Telemetry
//! stream; they answer with EndTransaction from `SOURCE_SERVER_CHECK`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use pb::Code;

use super::{ClientApi, convert, ok, resource_name, status, write_error_status};
use crate::messaging::transaction::{Decision, EndError};
use crate::store::{MessageType, TopicConfig, now_ms};

/// How often the check-back loop looks for due half messages.
const CHECK_TICK: Duration = Duration::from_millis(250);

impl ClientApi {
    /// Applies an EndTransaction request; the status to answer.
    pub(super) async fn end(&self, r: &pb::EndTransactionRequest) -> pb::Status {
        let topic = resource_name(&r.topic);
        if r.transaction_id.trim().is_empty() {
            return status(Code::InvalidTransactionId, "transaction id cannot be empty");
        }
        if self.store.metadata().get_topic(topic).is_none() {
            return status(Code::TopicNotFound, format!("topic {topic} does not exist"));
        }
        let decision = match pb::TransactionResolution::try_from(r.resolution) {
            Ok(pb::TransactionResolution::Commit) => Decision::Commit,
            Ok(pb::TransactionResolution::Rollback) => Decision::Rollback,
            // UNKNOWN, as upstream: nothing changes, the broker checks back.
            _ => return ok(),
        };
        let check_back = r.source == pb::TransactionSource::SourceServerCheck as i32;
        match self
            .transactions
            .end(
                &self.write,
                &r.transaction_id,
                &r.message_id,
                topic,
                decision,
            )
            .await
        {
            Ok(()) => {
                tracing::debug!(tx = %r.transaction_id, %decision, check_back, "transaction ended");
                if decision == Decision::Commit {
                    // The committed message was written to `topic` (the
                    // half message's topic, checked by `end`).
                    self.arrivals.notify(topic);
                }
                ok()
            }
            Err(EndError::Write(e)) => {
                tracing::warn!(error = %e, tx = %r.transaction_id, "transaction decision not written");
                write_error_status(&e)
            }
            Err(e) => status(Code::InvalidTransactionId, e.to_string()),
        }
    }

    /// Checks back unresolved half messages until `stop` resolves. Only a
    /// writable broker (the master) checks back: answers must be written.
    pub async fn run_transaction_checks(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(CHECK_TICK) => {}
            }
            if self.write.replication().check_writable().is_err() {
                // A slave keeps no transaction state: its log may yet be cut
                // at a fork point. Once promoted, the state is rebuilt from
                // the replicated progress and log.
                continue;
            }
            for due in self.transactions.due_checks(&self.write, now_ms()).await {
                let topic = self
                    .store
                    .metadata()
                    .get_topic(&due.message.topic)
                    .unwrap_or_else(|| TopicConfig {
                        name: due.message.topic.clone(),
                        queue_count: 1,
                        message_type: MessageType::Transaction,
                    });
                let message =
                    convert::message(&self.cfg, &topic, &due.message, None, Duration::ZERO);
                let cmd = pb::TelemetryCommand {
                    status: Some(ok()),
                    command: Some(
                        pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                            pb::RecoverOrphanedTransactionCommand {
                                message: Some(message),
                                transaction_id: due.tx_id.clone(),
                            },
                        ),
                    ),
                };
                let stats = &self.transactions.stats;
                match self.producers.send_to_one(&topic.name, cmd) {
                    Some(client) => {
                        stats.checks_sent.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(tx = %due.tx_id, topic = %topic.name, check = due.check, %client, "transaction checked back");
                    }
                    None => {
                        stats.checks_unanswerable.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(tx = %due.tx_id, topic = %topic.name, check = due.check, "no live producer of the topic to check a transaction back with");
                    }
                }
            }
        }
    }
}
