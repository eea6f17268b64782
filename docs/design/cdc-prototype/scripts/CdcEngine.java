import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

import java.io.FileInputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

/** Debezium embedded engine -> Kafka, at least once: a batch is marked processed only after the broker acked it.
 *  usage: java -cp 'jars/embedded/*:embedded/classes' CdcEngine engine.properties
 *  Properties prefixed "sink." configure the KafkaProducer (sink.bootstrap.servers, ...); the rest go to the engine. */
public class CdcEngine {
    public static void main(String[] args) throws Exception {
        Properties all = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) { all.load(in); }
        Properties engineProps = new Properties(), producerProps = new Properties();
        for (String k : all.stringPropertyNames()) {
            if (k.startsWith("sink.")) producerProps.put(k.substring(5), all.getProperty(k));
            else engineProps.put(k, all.getProperty(k));
        }
        producerProps.putIfAbsent("acks", "all");
        producerProps.putIfAbsent("enable.idempotence", "true");
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps, new ByteArraySerializer(), new ByteArraySerializer());
        CountDownLatch stopped = new CountDownLatch(1);
        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine.create(Json.class)
            .using(engineProps)
            .notifying((records, committer) -> {
                List<Future<RecordMetadata>> acks = new ArrayList<>(records.size());
                for (ChangeEvent<String, String> r : records) {
                    byte[] key = r.key() == null ? null : r.key().getBytes(StandardCharsets.UTF_8);
                    byte[] value = r.value() == null ? null : r.value().getBytes(StandardCharsets.UTF_8);
                    acks.add(producer.send(new ProducerRecord<>(r.destination(), key, value)));
                }
                try {
                    for (Future<RecordMetadata> f : acks) f.get();
                } catch (Exception e) {
                    throw new InterruptedException("Kafka send failed: " + e);  // engine stops; offsets not committed
                }
                for (ChangeEvent<String, String> r : records) committer.markProcessed(r);
                committer.markBatchFinished();
            })
            .using((success, message, error) -> {
                System.err.println("engine stopped: success=" + success + " " + message + (error != null ? " " + error : ""));
                stopped.countDown();
            })
            .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try { engine.close(); stopped.await(); producer.close(); } catch (Exception e) { e.printStackTrace(); }
        }));
        stopped.await();
        producer.close();
        executor.shutdown();
        System.exit(0);
    }
}
