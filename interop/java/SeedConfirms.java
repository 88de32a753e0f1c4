import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.ConfirmListener;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * Seed article, "生产者确认机制": confirmSelect, a persistent message (deliveryMode 2), a
 * ConfirmListener, basicPublish and waitForConfirms. Checks that the listener saw an ack for
 * the message, that waitForConfirms returned true, and that the message is in the queue.
 *
 * Usage: java SeedConfirms HOST PORT
 */
public class SeedConfirms {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedConfirms: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedConfirms", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String queueName = "seed.confirms." + System.nanoTime();
        String message = "persistent hello";

        // "ack tag multiple" / "nack tag multiple", in the order the listener saw them.
        BlockingQueue<String> seen = new LinkedBlockingQueue<>();

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            channel.queueDeclare(queueName, true, false, false, null);

            // 启用发布者确认
            channel.confirmSelect();

            // 将消息设置为持久化
            AMQP.BasicProperties properties = new AMQP.BasicProperties.Builder()
                    .deliveryMode(2)
                    .build();

            // 添加确认监听器
            channel.addConfirmListener(new ConfirmListener() {
                @Override
                public void handleAck(long deliveryTag, boolean multiple) throws IOException {
                    System.out.println("消息已确认: " + deliveryTag);
                    seen.add("ack " + deliveryTag + " " + multiple);
                }

                @Override
                public void handleNack(long deliveryTag, boolean multiple) throws IOException {
                    System.out.println("消息未确认: " + deliveryTag);
                    seen.add("nack " + deliveryTag + " " + multiple);
                }
            });

            long seqNo = channel.getNextPublishSeqNo();
            check(seqNo == 1, "the first publish sequence number after confirmSelect is 1 (got " + seqNo + ")");
            channel.basicPublish("", queueName, properties, message.getBytes());

            // 等待消息确认，或者超时 (the watchdog bounds the article's no-argument call)
            boolean allConfirmed = channel.waitForConfirms();
            check(allConfirmed, "waitForConfirms() returned true");

            String first = seen.poll(10, TimeUnit.SECONDS);
            check(first != null && first.startsWith("ack 1 "),
                    "the ConfirmListener saw an ack for delivery tag 1 (saw " + first + ")");

            // A second message, confirmed with the timeout variant.
            channel.basicPublish("", queueName, properties, "second".getBytes());
            check(channel.waitForConfirms(10_000), "waitForConfirms(10000) returned true for a second publish");
            String second = seen.poll(10, TimeUnit.SECONDS);
            check(second != null && second.startsWith("ack 2 "),
                    "the ConfirmListener saw an ack for delivery tag 2 (saw " + second + ")");
            check(!seen.toString().contains("nack"), "no nack was seen");

            GetResponse got = channel.basicGet(queueName, false);
            check(got != null, "the confirmed message is in the queue");
            check(message.equals(new String(got.getBody(), StandardCharsets.UTF_8)),
                    "it has the published body");
            Integer mode = got.getProps().getDeliveryMode();
            check(mode != null && mode == 2, "it is persistent (deliveryMode " + mode + ")");
            check(!got.getEnvelope().isRedeliver(), "it is not marked redelivered");
            channel.basicAck(got.getEnvelope().getDeliveryTag(), false);

            channel.queueDelete(queueName);
        }
        System.out.println("PASS SeedConfirms");
        System.exit(0);
    }
}
