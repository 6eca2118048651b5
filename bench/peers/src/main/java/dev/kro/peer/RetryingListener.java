package dev.kro.peer;

import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.locks.LockSupport;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.TopicPartition;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.kafka.annotation.KafkaListener;
import org.springframework.kafka.annotation.RetryableTopic;
import org.springframework.kafka.listener.ConsumerSeekAware;
import org.springframework.retry.annotation.Backoff;
import org.springframework.stereotype.Component;

/**
 * The service: a {@code @KafkaListener} with {@code @RetryableTopic}, Spring's non-blocking
 * retries. A failed call is published to {@code <topic>-retry} with its due time in a header;
 * the retry listener (same method, its own container and consumer) pauses the partition until
 * the record is due, then calls the method again; a call that fails there goes to {@code
 * <topic>-dlt}.
 *
 * <p>Only what the workload needs is set: the attempts and the delay (the same as our tier),
 * and {@code autoCreateTopics = "false"} because the harness creates (and deletes) the topics,
 * with the same partition count as ours. Every other setting is Spring's and Boot's default
 * (a single retry topic for a fixed delay, the DLT, the error handler, the container's ack
 * mode and poll timeout) unless the harness passes Boot properties on the command line (its
 * "tuned" variant).
 */
@Component
public class RetryingListener implements ConsumerSeekAware {
    private final EventLog log;
    private final String mainTopic;
    private final int failPercent;
    private final long handlerNanos;
    private final int expectPartitions;
    private final Set<TopicPartition> assigned = ConcurrentHashMap.newKeySet();

    public RetryingListener(
            EventLog log,
            @Value("${peer.topic}") String mainTopic,
            @Value("${peer.fail-percent}") int failPercent,
            @Value("${peer.handler-micros:0}") long handlerMicros,
            @Value("${peer.partitions}") int partitions) {
        this.log = log;
        this.mainTopic = mainTopic;
        this.failPercent = failPercent;
        this.handlerNanos = handlerMicros * 1_000L;
        this.expectPartitions = 2 * partitions; // the main topic's and the retry topic's
    }

    /**
     * Values are {@code <event id>,<produced ns>}. With {@code peer.fail-percent} -1 an event
     * fails on the main topic and succeeds on its retry; otherwise the same share of events as
     * ours fails on every attempt ({@link #fails}). A handler time is spent parked, as a
     * service's I/O would be.
     */
    @RetryableTopic(
            attempts = "${peer.attempts}",
            backoff = @Backoff(delayExpression = "${peer.delay-ms}"),
            autoCreateTopics = "false")
    @KafkaListener(topics = "${peer.topic}", groupId = "${peer.group}")
    public void handle(ConsumerRecord<String, String> record) {
        String value = record.value();
        long id = Long.parseLong(value.substring(0, value.indexOf(',')));
        if (id < 0) {
            return; // the harness's warm-up events
        }
        int stage = record.topic().equals(mainTopic) ? 0 : 1;
        if (handlerNanos > 0) {
            LockSupport.parkNanos(handlerNanos);
        }
        boolean fail = failPercent < 0 ? stage == 0 : fails(id, failPercent);
        log.event(fail ? 'F' : 'H', id, stage);
        if (fail) {
            throw new IllegalStateException("upstream unavailable for event " + id);
        }
    }

    /** The same spread as bench/peers.py's {@code fails}: which events are in the share. */
    static boolean fails(long id, int percent) {
        return Math.floorMod(id * 2654435761L, 100L) < percent;
    }

    /** Called on the main and the retry containers' threads; READY once both own theirs. */
    @Override
    public void onPartitionsAssigned(
            Map<TopicPartition, Long> assignments, ConsumerSeekCallback callback) {
        assigned.addAll(assignments.keySet());
        if (assigned.size() >= expectPartitions) {
            log.line("READY");
        }
    }
}
