import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DeliverCallback;
import com.rabbitmq.client.Delivery;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * Seed article, "消费者确认机制": basicConsume with autoAck=false and a DeliverCallback that
 * calls basicAck after processing. Checks that the message is delivered once, that the ack
 * removes it, and that a message a consumer received but never acked is not lost when the
 * consumer's channel goes away: it is redelivered with isRedeliver()==true.
 *
 * Usage: java SeedManualAck HOST PORT
 */
public class SeedManualAck {
    static void check(boolean ok, String what) {
        System.out.println((ok ? "ok   " : "FAIL ") + "SeedManualAck: " + what);
        if (!ok) {
            System.exit(1);
        }
    }

    public static void main(String[] args) throws Exception {
        Watchdog.start("SeedManualAck", 60);
        ConnectionFactory factory = new ConnectionFactory();
        factory.setHost(args[0]);
        factory.setPort(Integer.parseInt(args[1]));
        factory.setUsername("guest");
        factory.setPassword("guest");
        factory.setConnectionTimeout(10_000);
        String QUEUE_NAME = "seed.manual-ack." + System.nanoTime();

        try (Connection connection = factory.newConnection();
                Channel channel = connection.createChannel()) {
            channel.queueDeclare(QUEUE_NAME, true, false, false, null);
            channel.basicPublish("", QUEUE_NAME, MessageProperties.PERSISTENT_TEXT_PLAIN,
                    "work item 1".getBytes());

            // 1. The article's consumer: process, then basicAck.
            BlockingQueue<Delivery> processed = new LinkedBlockingQueue<>();
            DeliverCallback deliverCallback = (consumerTag, delivery) -> {
                try {
                    // 接收消息，业务处理
                    processed.add(delivery);
                    // 设置手动确认
                    channel.basicAck(delivery.getEnvelope().getDeliveryTag(), false);
                } catch (Exception e) {
                    // 发生异常时，可以选择重新发送消息或进行错误处理
                    channel.basicNack(delivery.getEnvelope().getDeliveryTag(), false, true);
                }
            };
            // 设置autoAck为false，表示关闭自动确认机制，改为手动确认
            boolean autoAck = false;
            String tag = channel.basicConsume(QUEUE_NAME, autoAck, deliverCallback, consumerTag -> {});

            Delivery d = processed.poll(10, TimeUnit.SECONDS);
            check(d != null, "the consumer received the message");
            check("work item 1".equals(new String(d.getBody(), StandardCharsets.UTF_8)), "with the published body");
            check(!d.getEnvelope().isRedeliver(), "on first delivery isRedeliver() is false");
            check(processed.poll(500, TimeUnit.MILLISECONDS) == null, "it is delivered only once");
            channel.basicCancel(tag);
            int left = channel.queueDeclarePassive(QUEUE_NAME).getMessageCount();
            check(left == 0, "after basicAck and basicCancel the queue is empty (message count " + left + ")");

            // 2. A consumer that dies before acking: the message must come back, not vanish.
            channel.basicPublish("", QUEUE_NAME, MessageProperties.PERSISTENT_TEXT_PLAIN,
                    "work item 2".getBytes());
            BlockingQueue<Delivery> received = new LinkedBlockingQueue<>();
            Channel crashing = connection.createChannel();
            crashing.basicConsume(QUEUE_NAME, false, (consumerTag, delivery) -> received.add(delivery),
                    consumerTag -> {});
            d = received.poll(10, TimeUnit.SECONDS);
            check(d != null && !d.getEnvelope().isRedeliver(), "a second consumer received a message and did not ack it");
            check(channel.queueDeclarePassive(QUEUE_NAME).getMessageCount() == 0,
                    "while unacked, the message is not ready in the queue");
            crashing.close(); // the consumer "crashes" before basicAck

            GetResponse again = channel.basicGet(QUEUE_NAME, false);
            check(again != null, "after the unacking channel closed, the message is back in the queue");
            check("work item 2".equals(new String(again.getBody(), StandardCharsets.UTF_8)), "it is the same message");
            check(again.getEnvelope().isRedeliver(), "it is marked isRedeliver()==true");
            channel.basicAck(again.getEnvelope().getDeliveryTag(), false);
            check(channel.queueDeclarePassive(QUEUE_NAME).getMessageCount() == 0, "after basicAck the queue is empty");

            channel.queueDelete(QUEUE_NAME);
        }
        System.out.println("PASS SeedManualAck");
        System.exit(0);
    }
}
